"""Weight arithmetic streamed chunk by chunk: variant + (student - base), the
transfer of a distilled student's change onto a post-trained teacher (METHOD.md §7).

Each output tensor reads the same element range of three source tensors,
widens them to float32, computes `variant + (student - base)` in exactly that
order, and rounds to the output dtype with the casts of checkpoint/cast.py
(round to nearest even for BF16, as torch does). Where an element of the
variant equals the base's, the result is the student's element itself (the
formula's exact value), so a variant equal to its base gives the student
back byte for byte. The writer runs these chunks
like casts, in its worker threads and pooled buffers, so memory stays a few
buffers whatever the model size.

While the operands are in memory, each chunk also adds up the dot product and
squared norms of the two changes, `variant - base` and `student - base`, in
float64: the cosine similarity that says how far the transfer can be trusted.

A NaN or infinity in any of the three sources reaches the result, which the
final cast checks (checkpoint/cast.py); only then are the chunk's sources read
again to say which model holds it. A result beyond the output dtype's range
is refused the same way.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from layersplice.checkpoint.safetensors_format import DTYPE_SIZES, TensorInfo
from layersplice.errors import NonFiniteError

# (dot(variant - base, student - base), |variant - base|², |student - base|²) of one chunk.
Products = tuple[float, float, float]
ChunkSink = Callable[[str, int, Products], None]


@dataclass(frozen=True)
class DeltaTensor:
    """One output tensor: variant + (student - base), written in `dtype` (the student's).

    `source` is the student's tensor, so that the writer lays it out and counts
    its progress like a cast of the student."""

    name: str
    source: TensorInfo
    base: TensorInfo
    variant: TensorInfo
    dtype: str
    # Receives each chunk's products; attached by the code that executes the plan.
    sink: ChunkSink | None = field(default=None, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def numel(self) -> int:
        return self.source.numel

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def model(self) -> str:
        return "student"  # as `source` is the student's tensor

    @property
    def is_copy(self) -> bool:
        return False

    @property
    def parts(self) -> tuple[DeltaTensor, ...]:
        return (self,)

    @property
    def inputs(self) -> tuple[tuple[str, TensorInfo], ...]:
        """(model, tensor) of the three sources, in the order the arithmetic reads them."""
        return ("teacher (variant)", self.variant), ("student", self.source), ("base teacher", self.base)

    def chunks(self, fd: Callable[[Path], int]) -> Callable[[int, int, bytearray], memoryview]:
        """The writer's chunk function: (first element, count, output buffer) -> bytes written."""
        fds = tuple(fd(info.file) for _, info in self.inputs)
        return functools.partial(_checked_chunk, self, fds)


_per_thread = threading.local()


def _work():
    """This thread's float32 arrays (variant, student, base, student - base) and mask, allocated once."""
    from layersplice.checkpoint.cast import IO_ELEMENTS, _numpy

    if not hasattr(_per_thread, "work"):
        np = _numpy()
        _per_thread.work = (*(np.empty(IO_ELEMENTS, np.float32) for _ in range(4)), np.empty(IO_ELEMENTS, bool))
    return _per_thread.work


def _read_f32(fd: int, info: TensorInfo, first: int, count: int, out) -> None:
    """Elements [first, first + count) of a source tensor, widened to float32 into `out`."""
    from layersplice.checkpoint.cast import cast_for

    size = DTYPE_SIZES[info.dtype]
    offset = info.start + first * size
    if info.dtype == "F32":
        target = memoryview(out[:count]).cast("B")
    else:
        cast = cast_for(info.dtype, "F32")
        target = cast.input[: count * size]
    if os.preadv(fd, [target], offset) != len(target):
        raise OSError(errno.EIO, f"{info.file}: tensor {info.name} is truncated")
    if info.dtype != "F32":
        cast.convert(target, memoryview(out[:count]).cast("B"))


def _checked_chunk(item: DeltaTensor, fds: tuple[int, ...], first: int, count: int, output) -> memoryview:
    from layersplice.checkpoint.cast import NonFinite

    try:
        return _delta_chunk(item, fds, first, count, output)
    except NonFinite as problem:
        raise NonFiniteError(_refusal(item, fds, first, count, problem)) from None


def _refusal(item: DeltaTensor, fds: tuple[int, ...], first: int, count: int, problem) -> str:
    """Which source holds the chunk's first NaN or infinity; else the result overflowed."""
    from layersplice.checkpoint.cast import _numpy, describe_value, values_of

    np = _numpy()
    for fd, (model, info) in zip(fds, item.inputs):
        size = DTYPE_SIZES[info.dtype]
        values = values_of(os.pread(fd, count * size, info.start + first * size), info.dtype)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            return (f"{info.file}: tensor {info.name!r} of the {model} holds {describe_value(float(values[bad[0]]))} "
                    f"at element {first + int(bad[0])}; transfer refuses non-finite weights, which would spread into "
                    "the student")
    return (f"tensor {item.name!r}: teacher + (student - base_teacher) is {describe_value(problem.value)} at element "
            f"{first + problem.element}, beyond the range of the student's {item.dtype}; transfer refuses to write it")


def _delta_chunk(item: DeltaTensor, fds: tuple[int, ...], first: int, count: int, output) -> memoryview:
    from layersplice.checkpoint.cast import _numpy, cast_for

    np = _numpy()
    variant, student, base, change, unchanged = (array[:count] for array in _work())
    for fd, (_, info), array in zip(fds, item.inputs, (variant, student, base)):
        _read_f32(fd, info, first, count, array)
    # Overflow and NaN are not warnings here: the cast below refuses any non-finite result.
    with np.errstate(all="ignore"):
        np.subtract(student, base, out=change)  # student - base
        np.subtract(variant, base, out=base)  # variant - base, for the similarity and the mask
        if item.sink is not None:
            item.sink(item.name, first, (
                float(np.einsum("i,i->", base, change, dtype=np.float64)),
                float(np.einsum("i,i->", base, base, dtype=np.float64)),
                float(np.einsum("i,i->", change, change, dtype=np.float64)),
            ))
        np.add(variant, change, out=variant)  # variant + (student - base)
        # Where the variant left an element as it was, the exact result is the student's
        # own value, which rounding student - base to float32 can miss by an ulp.
        np.equal(base, 0, out=unchanged)
        np.copyto(variant, student, where=unchanged)
    return cast_for("F32", item.dtype).convert(memoryview(variant).cast("B"), output)
