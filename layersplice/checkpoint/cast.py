"""Floating-point casts of raw little-endian tensor bytes, one chunk at a time.

Not torch: importing it costs seconds and ~200 MiB, more than a whole cast of
a multi-GB checkpoint. F32 -> BF16, the common cast, runs in a small compiled
loop (_fastcast.c, built at install when a C compiler is present: over 10 G
elements/s on one core here). Every other pair, and F32 -> BF16 where the loop
was not built or LAYERSPLICE_NATIVE=0, goes through numpy (~1.5 G elements/s):
the same bytes, which are torch's. Every cast goes through float32, as
torch's does: to BF16 it rounds to nearest even (NaN as torch writes it);
F16/F64 use IEEE conversions (overflow to inf is the cast's meaning, not an
error).

Callers hand over up to IO_ELEMENTS elements at a time. numpy walks them in
chunks of 128K that stay in the L2 cache between its passes. Input and work
buffers are allocated once per Cast (a few MiB); callers lend the output
buffers.
"""

from __future__ import annotations

import functools
import os
import threading
from types import ModuleType

from layersplice.checkpoint.safetensors_format import DTYPE_SIZES

CHUNK_ELEMENTS = 1 << 17  # numpy converts this many at a time: fits the L2 cache
IO_ELEMENTS = 1 << 20  # the most one convert() takes
# What torch's CPU casts write for a NaN: its vectorized float path gives 0xFFFF,
# its half -> bfloat16 path 0x7FC0.
BF16_NAN = {"F16": 0x7FC0}
BF16_NAN_DEFAULT = 0xFFFF


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
    return _fastcast


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
        self._compiled = compiled.f32_to_bf16 if compiled else None

    @property
    def is_native(self) -> bool:
        return self._compiled is not None

    def convert(self, source, output) -> memoryview:
        """`source` (a buffer of at most IO_ELEMENTS elements' bytes) converted into
        `output` (a writable buffer large enough); returns the bytes written."""
        if self._compiled is not None:
            return memoryview(output)[: self._compiled(source, output)]
        np = _numpy()
        raw, out = np.frombuffer(source, np.uint8), np.frombuffer(output, np.uint8)
        count = len(raw) // self.in_size
        with np.errstate(all="ignore"):
            for first in range(0, count, CHUNK_ELEMENTS):
                n = min(CHUNK_ELEMENTS, count - first)
                values = self._to_f32(raw[first * self.in_size : (first + n) * self.in_size], n)
                self._from_f32(values, out[first * self.out_size : (first + n) * self.out_size])
        return memoryview(output)[: count * self.out_size]

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


def _float(dtype: str):
    return _numpy().dtype(dtype.replace("F", "float"))  # F16 -> float16


_per_thread = threading.local()


def cast_for(src: str, dst: str) -> Cast:
    """This thread's Cast for a dtype pair, so that its buffers are allocated once."""
    casts = _per_thread.__dict__.setdefault("casts", {})
    key = (src, dst, IO_ELEMENTS)  # the input buffer holds IO_ELEMENTS
    if key not in casts:
        casts[key] = Cast(src, dst)
    return casts[key]
