"""Resolve what the user named (paths or hub ids, alignment sources) into a checked pair."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layersplice.architectures.layout import Layout, layout_of
from layersplice.checkpoint.source import Checkpoint, open_checkpoint
from layersplice.planning.alignment import STUDENT_CONFIG_NAME, AlignmentSpec, read_student_config, resolve_alignment
from layersplice.planning.plan import STUDENT, TEACHER, Pair, check_pair


@dataclass(frozen=True)
class Job:
    teacher: Checkpoint
    student: Checkpoint
    pair: Pair
    alignment_origin: str
    cast: str | None
    warnings: tuple[str, ...] = ()

    def checkpoint(self, model: str) -> Checkpoint:
        return self.teacher if model == TEACHER else self.student

    @property
    def layouts(self) -> dict[str, Layout]:
        return {TEACHER: self.pair.teacher, STUDENT: self.pair.student}

    @property
    def configs(self) -> dict[str, dict]:
        return {TEACHER: self.teacher.config, STUDENT: self.student.config}

    def describe_sources(self) -> dict:
        return {TEACHER: self.teacher.describe(), STUDENT: self.student.describe()}


def open_job(
    teacher: str,
    student: str,
    specs: list[AlignmentSpec],
    cast: str | None = None,
    revisions: tuple[str | None, str | None] = (None, None),
    arch_file: Path | None = None,
    allow_pickle: bool = False,
) -> Job:
    t_ckpt = open_checkpoint(teacher, revisions[0], allow_pickle)
    s_ckpt = open_checkpoint(student, revisions[1], allow_pickle)
    t_layout = layout_of(t_ckpt, arch_file)
    s_layout = layout_of(s_ckpt, arch_file)
    # Read once: it is the last alignment source, and what an overriding alignment is compared with.
    recorded = read_student_config(s_ckpt.directory)
    own = [AlignmentSpec(copied=recorded, origin=str(s_ckpt.directory / STUDENT_CONFIG_NAME))] if recorded is not None else []
    alignment, origin = resolve_alignment([*specs, *own], t_layout.n_layers, None)
    pair = check_pair(t_layout, s_layout, alignment, cast)
    notes = _disagreement(recorded, alignment.copied, origin)
    if t_layout.inferred and t_layout.per_layer_lists:
        notes += (f"inferred family: treating {', '.join(t_layout.per_layer_lists)} as per-layer lists",)
    return Job(t_ckpt, s_ckpt, pair, origin, cast, notes)


def _disagreement(recorded: tuple[int, ...] | None, copied: tuple[int, ...], origin: str) -> tuple[str, ...]:
    if recorded is None or tuple(recorded) == copied:
        return ()
    return (
        f"the alignment from {origin} ({list(copied)}) overrides the student's own "
        f"student_config.json ({list(recorded)})",
    )


def single_layout(
    reference: str, revision: str | None = None, arch_file: Path | None = None, allow_pickle: bool = False
) -> tuple[Checkpoint, Layout]:
    checkpoint = open_checkpoint(reference, revision, allow_pickle)
    return checkpoint, layout_of(checkpoint, arch_file)
