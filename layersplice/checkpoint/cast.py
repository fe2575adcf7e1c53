"""Floating-point casts of raw little-endian tensor bytes, one chunk at a time.

Not torch: importing it costs seconds and ~200 MiB, more than a whole cast of
a multi-GB checkpoint. F32 -> BF16, the common cast, runs in a small compiled
loop (_fastcast.c, built at install when a C compiler is present: over 10 G
elements/s on one core here). Every other pair, and F32 -> BF16 where the loop
was not built or LAYERSPLICE_NATIVE=0, goes through numpy (~1.5 G elements/s):
the same bytes, which are torch's. Every cast goes through float32, as
torch's does: to BF16 it rounds to nearest even (NaN as torch writes it);
F16/F64 use IEEE conversions.

A cast never writes NaN or infinity silently: every chunk's output is checked
while it is in the cache (in the compiled loop's own pass, or two cheap numpy
passes per chunk), and a non-finite value raises NonFinite, which says
whether the source held it or a finite value lay beyond the target's range
(1e6 cast to F16). Builds then refuse the tensor instead of writing it.

Callers hand over up to IO_ELEMENTS elements at a time. numpy walks them in
chunks of 128K that stay in the L2 cache between its passes. Input and work
buffers are allocated once per Cast (a few MiB); callers lend the output
buffers.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from types import ModuleType

from layersplice.checkpoint.safetensors_format import DTYPE_SIZES, TensorInfo

CHUNK_ELEMENTS = 1 << 17  # numpy converts this many at a time: fits the L2 cache
IO_ELEMENTS = 1 << 20  # the most one convert() takes
# What torch's CPU casts write for a NaN: its vectorized float path gives 0xFFFF,
# its half -> bfloat16 path 0x7FC0.
BF16_NAN = {"F16": 0x7FC0}
BF16_NAN_DEFAULT = 0xFFFF
# The exponent bits of each float dtype: all set means NaN or infinity.
EXPONENT_BITS = {"BF16": 0x7F80, "F16": 0x7C00, "F32": 0x7F80_0000, "F64": 0x7FF0_0000_0000_0000}
# Float dtypes by the values they hold: a cast up this order keeps every finite value
# finite (F32 -> BF16 may round past BF16's largest value, so BF16 sits below F32).
RANGE_ORDER = ("F16", "BF16", "F32", "F64")


class NonFinite(ValueError):
    """A cast's output holds NaN or infinity at `element` (of the converted chunk).

    `value` is the source's element there: itself NaN or infinite when the source
    holds it (`in_source`), else a finite value beyond the target's range."""

    def __init__(self, element: int, value: float) -> None:
        self.element = element
        self.value = value
        self.in_source = not math.isfinite(value)
        super().__init__(f"element {element} ({value!r}) is not finite after the cast")


def switched_off() -> bool:
    """Whether the user asked for numpy casts (LAYERSPLICE_NATIVE=0)."""
    return os.environ.get("LAYERSPLICE_NATIVE", "1") == "0"


@functools.cache
def native() -> ModuleType | None:
    """The compiled conversion, or None where it was not built or is switched off."""
    if switched_off():
        return None
    try:
        from layersplice.checkpoint import _fastcast
    except ImportError:
        return None
    # A build from before the loop checked finiteness has only f32_to_bf16: numpy then.
    return _fastcast if hasattr(_fastcast, "f32_to_bf16_checked") else None


@functools.cache
def _numpy() -> ModuleType:
    # numpy's OpenBLAS starts worker threads at import that spin for a while:
    # ~0.1 s of a 2-core machine's CPU during a cast, which never calls BLAS.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import numpy

    return numpy


class Cast:
    """Converts chunks of `src` dtype bytes to `dst` dtype bytes."""

    def __init__(self, src: str, dst: str) -> None:
        self.src, self.dst = src, dst
        self.in_size, self.out_size = DTYPE_SIZES[src], DTYPE_SIZES[dst]
        self.input = memoryview(bytearray(IO_ELEMENTS * self.in_size))  # for callers to read into
        compiled = native() if (src, dst) == ("F32", "BF16") else None
        self._compiled = compiled.f32_to_bf16_checked if compiled else None

    @property
    def is_native(self) -> bool:
        return self._compiled is not None

    def convert(self, source, output) -> memoryview:
        """`source` (a buffer of at most IO_ELEMENTS elements' bytes) converted into
        `output` (a writable buffer large enough); returns the bytes written.

        Raises NonFinite when an output value is NaN or infinite."""
        if self._compiled is not None:
            written, finite = self._compiled(source, output)
        else:
            written, finite = self._numpy_convert(source, output)
        if not finite:
            raise self._non_finite(source, memoryview(output)[:written])
        return memoryview(output)[:written]

    def _numpy_convert(self, source, output) -> tuple[int, bool]:
        np = _numpy()
        raw, out = np.frombuffer(source, np.uint8), np.frombuffer(output, np.uint8)
        count = len(raw) // self.in_size
        # A cast that cannot overflow writes a non-finite value exactly where the
        # source holds one; the source is then the smaller side to check.
        check_source = RANGE_ORDER.index(self.dst) > RANGE_ORDER.index(self.src)
        finite = True
        with np.errstate(all="ignore"):
            for first in range(0, count, CHUNK_ELEMENTS):
                n = min(CHUNK_ELEMENTS, count - first)
                chunk = raw[first * self.in_size : (first + n) * self.in_size]
                written = out[first * self.out_size : (first + n) * self.out_size]
                self._from_f32(self._to_f32(chunk, n), written)
                finite = finite and (self._finite(chunk, self.src) if check_source else self._finite(written, self.dst))
        return count * self.out_size, finite

    @staticmethod
    def _finite(chunk, dtype: str) -> bool:
        """Whether no value of a chunk of `dtype` has every exponent bit set, by two read-only
        max reductions while the chunk is in the cache: read as signed integers, +inf and
        +NaN are the largest values; read as unsigned, -inf and -NaN are."""
        size = DTYPE_SIZES[dtype]
        unsigned = chunk.view(_uint(size))
        if not len(unsigned):
            return True
        exponent, sign = EXPONENT_BITS[dtype], 1 << (8 * size - 1)
        return int(unsigned.view(f"int{8 * size}").max()) < exponent and int(unsigned.max()) < sign | exponent

    def _non_finite(self, source, output) -> NonFinite:
        """The first non-finite output and the source value it came from (only on failure)."""
        np = _numpy()
        bits = np.frombuffer(output, _uint(self.out_size))
        mask = EXPONENT_BITS[self.dst]
        element = int(np.flatnonzero((bits & mask) == mask)[0])
        raw = memoryview(source)[element * self.in_size : (element + 1) * self.in_size]
        return NonFinite(element, float(values_of(raw, self.src)[0]))

    @functools.cached_property
    def _work(self):
        """float32 and uint32 chunks for the numpy path."""
        np = _numpy()
        return np.empty(CHUNK_ELEMENTS, np.float32), np.empty(CHUNK_ELEMENTS, np.uint32)

    def _to_f32(self, raw, count: int):
        np = _numpy()
        if self.src == "F32":
            return raw.view(np.float32)
        f32 = self._work[0][:count]
        if self.src == "BF16":
            bits = f32.view(np.uint32)
            np.copyto(bits, raw.view(np.uint16), casting="unsafe")
            np.left_shift(bits, 16, out=bits)
        else:
            np.copyto(f32, raw.view(_float(self.src)), casting="unsafe")
        return f32

    def _from_f32(self, values, out) -> None:
        np = _numpy()
        if self.dst == "BF16":
            self._f32_to_bf16(values, out.view(np.uint16))
        else:
            np.copyto(out.view(_float(self.dst)), values, casting="unsafe")

    def _f32_to_bf16(self, values, out) -> None:
        """Round to nearest even: (bits + 0x7FFF + lowest kept bit) >> 16."""
        np = _numpy()
        bits = values.view(np.uint32)
        work = self._work[1][: len(bits)]
        np.right_shift(bits, 16, out=work)
        np.bitwise_and(work, 1, out=work)
        np.add(work, bits, out=work)
        np.add(work, 0x7FFF, out=work)
        np.right_shift(work, 16, out=out, casting="unsafe")
        if np.isnan(np.max(values)):  # max propagates NaN: one cheap pass; NaN is rare in weights
            out[np.isnan(values)] = BF16_NAN.get(self.src, BF16_NAN_DEFAULT)


def values_of(raw, dtype: str):
    """The values of raw little-endian `dtype` bytes as a numpy array, unchecked (for diagnosing)."""
    np = _numpy()
    if dtype == "BF16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, _float(dtype))


def describe_value(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:g}"


def cast_refusal(problem: NonFinite, info: TensorInfo, model: str, first: int, dst: str) -> str:
    """The one-line error for a non-finite value met while casting elements [first, ...) of
    `info`, a tensor of `model` (the teacher, the student), to `dst`."""
    where = f"{info.file}: tensor {info.name!r} of the {model} holds {describe_value(problem.value)} at element " \
            f"{first + problem.element}"
    if problem.in_source:
        return f"{where}; refusing to cast non-finite weights (the checkpoint is damaged or diverged in training)"
    return f"{where}, beyond the range of {dst}, so the cast would make it infinite; choose a --dtype that holds it"


def _float(dtype: str):
    return _numpy().dtype(dtype.replace("F", "float"))  # F16 -> float16


def _uint(size: int):
    return _numpy().dtype(f"uint{8 * size}")


_per_thread = threading.local()


def cast_for(src: str, dst: str) -> Cast:
    """This thread's Cast for a dtype pair, so that its buffers are allocated once."""
    casts = _per_thread.__dict__.setdefault("casts", {})
    key = (src, dst, IO_ELEMENTS)  # the input buffer holds IO_ELEMENTS
    if key not in casts:
        casts[key] = Cast(src, dst)
    return casts[key]
