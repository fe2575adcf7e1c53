"""verify --against-sources for a transfer: re-plan from the recorded sources and
recompute teacher + (student - base_teacher) with torch, chunk by chunk, as an
independent check of the streamed arithmetic (checkpoint/delta.py)."""

from __future__ import annotations

import os

from layersplice.checkpoint.delta import DeltaTensor
from layersplice.checkpoint.safetensors_format import DTYPE_SIZES, TensorInfo
from layersplice.planning.alignment import AlignmentSpec
from layersplice.planning.transfer import BASE, STUDENT, VARIANT, open_transfer

CHUNK_ELEMENTS = 4 << 20


def replan_transfer(provenance: dict, source_ref) -> tuple[DeltaTensor, ...]:
    """The transfer's tensors, re-planned from the sources layersplice.json records."""
    sources = provenance["sources"]
    references = {role: source_ref(sources[role]) for role in (BASE, VARIANT, STUDENT)}
    spec = AlignmentSpec(copied=tuple(provenance["alignment"]["copied_teacher_layers"]), origin="the provenance")
    # The recorded alignment is what was built, even where --override-alignment chose it over the student's record.
    return open_transfer(references, {}, [spec], override_alignment=True).tensors


def recomputes(item: DeltaTensor, out: TensorInfo) -> bool:
    """Whether the output tensor `out` holds item's arithmetic, recomputed chunk by chunk."""
    import torch

    for first in range(0, item.numel, CHUNK_ELEMENTS):
        count = min(CHUNK_ELEMENTS, item.numel - first)
        variant, student, base = (_read(info, first, count).float() for info in (item.variant, item.source, item.base))
        # Elements the variant left unchanged are the student's own (checkpoint/delta.py).
        expected = torch.where(variant == base, student, variant + (student - base)).to(_torch_dtype(item.dtype))
        if not torch.equal(expected.view(torch.uint8), _read(out, first, count).view(torch.uint8)):
            return False
    return True


def _read(info: TensorInfo, first: int, count: int):
    import torch

    size = DTYPE_SIZES[info.dtype]
    with open(info.file, "rb") as f:
        data = os.pread(f.fileno(), count * size, info.start + first * size)
    return torch.frombuffer(bytearray(data), dtype=_torch_dtype(info.dtype))


def _torch_dtype(dtype: str):
    from layersplice.checkpoint.torch_dtypes import TORCH_DTYPES

    return TORCH_DTYPES[dtype]
