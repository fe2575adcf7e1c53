"""Teacher/student layer alignment: first/every/last, student_config.json, blocks.

Student layer i stands for the teacher block [copied[i], copied[i+1]); the last
block ends at the teacher's layer count N (METHOD.md §2).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from layersplice.checkpoint.bounded import CONFIG_LIMIT, read_bounded
from layersplice.errors import AlignmentError

STUDENT_CONFIG_NAME = "student_config.json"


@dataclass(frozen=True)
class Alignment:
    """Which teacher layer each student layer was copied from."""

    copied: tuple[int, ...]
    n_teacher: int

    def __post_init__(self) -> None:
        if not self.copied:
            raise AlignmentError("the alignment keeps no teacher layer; give at least one")
        if self.copied[0] != 0:
            raise AlignmentError(
                f"copied teacher layers must start at 0 (got {self.copied[0]}): "
                "every teacher layer must belong to some student block"
            )
        if any(b <= a for a, b in zip(self.copied, self.copied[1:])):
            raise AlignmentError(
                f"copied teacher layers must be strictly increasing, got {list(self.copied)}"
            )
        if self.copied[-1] >= self.n_teacher:
            raise AlignmentError(
                f"copied teacher layer {self.copied[-1]} does not exist: "
                f"the teacher has {self.n_teacher} layers (0..{self.n_teacher - 1})"
            )

    @property
    def n_student(self) -> int:
        return len(self.copied)

    @functools.cached_property
    def blocks(self) -> tuple[tuple[int, int], ...]:
        """Teacher layer range [start, end) that each student layer stands for."""
        ends = self.copied[1:] + (self.n_teacher,)
        return tuple(zip(self.copied, ends))

    @property
    def pruned(self) -> tuple[int, ...]:
        kept = set(self.copied)
        return tuple(i for i in range(self.n_teacher) if i not in kept)

    def block_length(self, i: int) -> int:
        start, end = self.blocks[i]
        return end - start

    def student_config(self) -> dict:
        """The reference's student_config.json content."""
        return {
            "pruned_teacher_layers": list(self.pruned),
            "copied_teacher_layers": list(self.copied),
        }

    def hidden_state_pairs(self) -> tuple[tuple[int, int], ...]:
        """(student, teacher) hidden-state indices aligned by the cosine loss.

        Index 0 is the embedding output and index j the output of layer j-1, so
        student layer i is aligned with the teacher's output at the end of its
        block. The final normed states are aligned separately by the loss.
        """
        pairs = [(0, 0)]
        for i, (_, end) in enumerate(self.blocks[:-1]):
            pairs.append((i + 1, end))
        return tuple(pairs)


def copied_from_rule(n_teacher: int, first: int, every: int, last: int) -> tuple[int, ...]:
    """Kept teacher layers for the reference's first/every/last rule (METHOD.md §2)."""
    if first < 0 or last < 0 or every < 1:
        raise AlignmentError(
            f"invalid rule first={first} every={every} last={last}: "
            "first and last must be >= 0 and every >= 1"
        )
    cut: set[int] = set()
    j = 0
    while (closer := first + every * (j + 1) - 1) <= n_teacher - last:
        cut.update(range(closer - every + 1, closer))
        j += 1
    copied = tuple(i for i in range(n_teacher) if i not in cut)
    if not copied:
        raise AlignmentError(f"rule first={first} every={every} last={last} keeps no layer")
    return copied


def parse_layer_list(text: str) -> tuple[int, ...]:
    """Parse '0,2,4' into (0, 2, 4) with a clear error."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part != "")
    except ValueError:
        raise AlignmentError(
            f"cannot read layer list {text!r}: give comma-separated integers such as 0,2,4"
        ) from None


def read_student_config(directory: Path) -> tuple[int, ...] | None:
    """copied_teacher_layers from a student's student_config.json, or None if absent."""
    path = directory / STUDENT_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(read_bounded(path, CONFIG_LIMIT, STUDENT_CONFIG_NAME, AlignmentError))
        layers = data["copied_teacher_layers"]
        if not isinstance(layers, list) or not all(isinstance(x, int) for x in layers):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
        raise AlignmentError(
            f"{path}: expected JSON with an integer list 'copied_teacher_layers'"
        ) from None
    return tuple(layers)


@dataclass(frozen=True)
class AlignmentSpec:
    """What the user asked for, before it is resolved against the checkpoints."""

    copied: tuple[int, ...] | None = None
    rule: tuple[int, int, int] | None = None  # first, every, last
    origin: str = ""


def resolve_alignment(
    specs: list[AlignmentSpec], n_teacher: int, student_dir: Path | None
) -> tuple[Alignment, str]:
    """First spec that says something wins; then the student's student_config.json."""
    for spec in specs:
        if spec.copied is not None:
            return Alignment(spec.copied, n_teacher), spec.origin
        if spec.rule is not None:
            return Alignment(copied_from_rule(n_teacher, *spec.rule), n_teacher), spec.origin
    if student_dir is not None:
        copied = read_student_config(student_dir)
        if copied is not None:
            return Alignment(copied, n_teacher), str(student_dir / STUDENT_CONFIG_NAME)
    raise AlignmentError(
        "no alignment given: pass --copied-teacher-layers 0,2,4,... or --first/--every/--last, "
        "set 'alignment' in the recipe, or give a student with student_config.json"
    )


def student_alignment(
    specs: list[AlignmentSpec], n_teacher: int, student_dir: Path, override: bool = False
) -> tuple[Alignment, str, str | None]:
    """The alignment of the first spec that says something, else the student's own record.

    A spec that contradicts the student's student_config.json would splice
    the wrong layers with nothing else to notice (the layer count can be the
    same), so it is refused unless `override`. Returns (alignment, where it
    came from, a note when an override replaced the record)."""
    recorded = read_student_config(student_dir)
    record = str(student_dir / STUDENT_CONFIG_NAME)
    own = [AlignmentSpec(copied=recorded, origin=record)] if recorded is not None else []
    alignment, origin = resolve_alignment([*specs, *own], n_teacher, None)
    if recorded is None or alignment.copied == recorded:
        return alignment, origin, None
    shown = f"{origin} keeps teacher layers {_layers(alignment.copied)}, but {record} records {_layers(recorded)}"
    if not override:
        raise AlignmentError(
            f"the alignment from {shown}, the layers this student was made from; splicing with another alignment "
            "pairs the wrong layers. Drop the alignment options (or the recipe's alignment), or pass "
            "--override-alignment if the student's record is wrong"
        )
    return alignment, origin, f"--override-alignment: the alignment from {shown}; using the former"


def _layers(copied: tuple[int, ...]) -> str:
    return ",".join(map(str, copied))
