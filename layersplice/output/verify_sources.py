"""verify --against-sources: re-plan from the provenance and compare every
output tensor with the teacher or student byte range it came from (or, for a
transfer, recompute it from its three sources)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from layersplice.architectures.layout import layout_of
from layersplice.checkpoint.source import Checkpoint, open_checkpoint
from layersplice.checkpoint.writer import WriteItem
from layersplice.errors import LayerspliceError
from layersplice.output.family import DISTILLED
from layersplice.planning.alignment import Alignment, AlignmentSpec
from layersplice.planning.job import open_job
from layersplice.planning.plan import TEACHER, PlannedTensor, make_plan, student_init_plan

CHUNK = 16 << 20


class SourceMismatch(LayerspliceError):
    pass


def _source_ref(entry: dict) -> str:
    directory = entry.get("directory")
    return directory if directory and Path(directory).is_dir() else entry["reference"]


def _replan(provenance: dict) -> list[PlannedTensor]:
    sources = provenance["sources"]
    alignment = provenance["alignment"]
    cast = provenance.get("dtype")
    if provenance.get("kind") == "init-student":
        teacher = open_checkpoint(_source_ref(sources[TEACHER]))
        layout = layout_of(teacher)
        aligned = Alignment(tuple(alignment["copied_teacher_layers"]), layout.n_layers)
        return list(student_init_plan(layout, aligned, cast).tensors)
    spec = AlignmentSpec(copied=tuple(alignment["copied_teacher_layers"]), origin="the provenance")
    # The recorded alignment is what was built, even where --override-alignment chose it over the student's record.
    job = open_job(_source_ref(sources["teacher"]), _source_ref(sources["student"]), [spec], cast,
                   override_alignment=True)
    return list(make_plan(job.pair, frozenset(provenance["patched_blocks"]), cast).tensors)


def check_against_sources(directory: Path, provenance: dict, output: Checkpoint) -> None:
    if provenance.get("kind") == "transfer":
        return _check_transfer(directory, provenance, output)
    if provenance.get("kind") == DISTILLED:
        return _check_distilled(directory, provenance, output)
    try:
        planned = _replan(provenance)
    except LayerspliceError as exc:
        raise SourceMismatch(f"{directory}: cannot re-open the sources recorded in layersplice.json: {exc}") from None
    check_planned_layout(directory, planned, output)
    for item in planned:
        out = output.tensors[item.name]
        start = out.start
        for part in item.parts:  # a fused tensor is several source ranges, one after another
            if not _same_bytes(part, out.file, start):
                raise SourceMismatch(
                    f"{directory}: tensor {item.name!r} differs from {item.model} tensor {part.source.name!r} "
                    f"in {part.source.file}"
                )
            start += part.nbytes


def check_planned_layout(directory: Path, planned: Sequence[WriteItem], output: Checkpoint) -> None:
    """The output holds exactly the planned tensors, each in its planned dtype and shape."""
    names = {p.name for p in planned}
    if names != set(output.tensors):
        odd = sorted(names ^ set(output.tensors))[0]
        raise SourceMismatch(f"{directory}: tensor {odd!r} does not match the plan re-made from the sources")
    for item in planned:
        out = output.tensors[item.name]
        if out.dtype != item.dtype or out.shape != item.shape:
            raise SourceMismatch(f"{directory}: tensor {item.name!r} has dtype/shape {out.dtype} {list(out.shape)}, sources say {item.dtype} {list(item.shape)}")


def _check_transfer(directory: Path, provenance: dict, output: Checkpoint) -> None:
    """A transfer's tensors are computed, not copied: recompute each one from its three sources."""
    from layersplice.output.transfer_check import recomputes, replan_transfer

    try:
        planned = replan_transfer(provenance, _source_ref)
    except LayerspliceError as exc:
        raise SourceMismatch(f"{directory}: cannot re-open the sources recorded in layersplice.json: {exc}") from None
    check_planned_layout(directory, planned, output)
    for item in planned:
        if not recomputes(item, output.tensors[item.name]):
            raise SourceMismatch(
                f"{directory}: tensor {item.name!r} is not teacher + (student - base_teacher) of "
                f"{item.variant.name!r}, {item.source.name!r} and {item.base.name!r}"
            )


def _check_distilled(directory: Path, provenance: dict, output: Checkpoint) -> None:
    """Trained weights cannot be recomputed from their sources: the student must hold exactly the
    tensors of the initial student it was trained from, in the same dtypes and shapes."""
    try:
        initial = open_checkpoint(_source_ref(provenance["sources"]["student"]))
    except LayerspliceError as exc:
        raise SourceMismatch(f"{directory}: cannot re-open the student recorded in layersplice.json: {exc}") from None
    check_planned_layout(directory, list(initial.tensors.values()), output)


def _same_bytes(item: PlannedTensor, out_file: Path, out_start: int) -> bool:
    if item.is_copy:
        return _ranges_equal(item.source.file, item.source.start, out_file, out_start, item.nbytes)
    import torch

    from layersplice.checkpoint.safetensors_format import DTYPE_SIZES
    from layersplice.checkpoint.torch_dtypes import TORCH_DTYPES

    step = CHUNK // DTYPE_SIZES[item.source.dtype]
    in_size, out_size = DTYPE_SIZES[item.source.dtype], DTYPE_SIZES[item.dtype]
    with open(item.source.file, "rb") as src, open(out_file, "rb") as dst:
        for first in range(0, item.source.numel, step):
            count = min(step, item.source.numel - first)
            a = os.pread(src.fileno(), count * in_size, item.source.start + first * in_size)
            b = os.pread(dst.fileno(), count * out_size, out_start + first * out_size)
            cast = torch.frombuffer(bytearray(a), dtype=TORCH_DTYPES[item.source.dtype]).to(TORCH_DTYPES[item.dtype])
            if cast.view(torch.uint8).numpy().tobytes() != b:
                return False
    return True


def _ranges_equal(a_path: Path, a_start: int, b_path: Path, b_start: int, length: int) -> bool:
    with open(a_path, "rb") as a, open(b_path, "rb") as b:
        for offset in range(0, length, CHUNK):
            n = min(CHUNK, length - offset)
            if os.pread(a.fileno(), n, a_start + offset) != os.pread(b.fileno(), n, b_start + offset):
                return False
    return True
