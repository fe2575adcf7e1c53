"""Resolve what the user named (paths or hub ids, alignment sources) into a checked pair."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layersplice.architectures.layout import Layout, layout_of
from layersplice.checkpoint.source import Checkpoint, declare_hub_id, open_checkpoint
from layersplice.planning.alignment import AlignmentSpec, student_alignment
from layersplice.planning.plan import STUDENT, TEACHER, Pair, check_pair


@dataclass(frozen=True)
class Job:
    teacher: Checkpoint
    student: Checkpoint
    pair: Pair
    alignment_origin: str
    cast: str | None
    warnings: tuple[str, ...] = ()
    hub_owner: str | None = None  # the Hub user or organization the outputs go to, for their cards

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
    override_alignment: bool = False,
    hub_ids: tuple[str | None, str | None] = (None, None),
) -> Job:
    """`override_alignment`: accept an alignment that contradicts the student's student_config.json.
    `hub_ids`: the Hub repos local copies of the teacher and student came from (--teacher-id, --student-id)."""
    t_ckpt = declare_hub_id(open_checkpoint(teacher, revisions[0], allow_pickle), hub_ids[0], "--teacher-id")
    s_ckpt = declare_hub_id(open_checkpoint(student, revisions[1], allow_pickle), hub_ids[1], "--student-id")
    t_layout = layout_of(t_ckpt, arch_file)
    s_layout = layout_of(s_ckpt, arch_file)
    alignment, origin, overridden = student_alignment(specs, t_layout.n_layers, s_ckpt.directory, override_alignment)
    pair = check_pair(t_layout, s_layout, alignment, cast)
    notes = (overridden,) if overridden else ()
    if t_layout.inferred and t_layout.per_layer_lists:
        notes += (f"inferred family: treating {', '.join(t_layout.per_layer_lists)} as per-layer lists",)
    return Job(t_ckpt, s_ckpt, pair, origin, cast, notes)


def single_layout(
    reference: str, revision: str | None = None, arch_file: Path | None = None, allow_pickle: bool = False
) -> tuple[Checkpoint, Layout]:
    checkpoint = open_checkpoint(reference, revision, allow_pickle)
    return checkpoint, layout_of(checkpoint, arch_file)
