"""Floating-point casts of raw little-endian tensor bytes, one small chunk at a time.

numpy rather than torch: importing torch costs seconds and ~200 MiB, more
than a whole cast of a multi-GB checkpoint. Every cast goes through float32,
as torch's does, and gives the bytes torch's CPU casts give: to BF16 it rounds
to nearest even (NaN as torch writes it); F16/F64 use IEEE conversions
(overflow to inf is the cast's meaning, not an error).
Callers hand over up to 1M elements at a time; the conversion walks them in
chunks of 128K that stay in the L2 cache between its few passes (1.7 G
elements/s for F32 -> BF16 on one core here, twice what 64K chunks with a
sum-based NaN test gave). Input and work buffers are allocated once per Cast
(a few MiB); callers lend the output buffers (output_buffer).
"""

from __future__ import annotations

import os
import threading

# numpy's OpenBLAS starts worker threads at import that spin for a while: ~0.1 s
# of a 2-core machine's CPU during a cast, which never calls BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

from layersplice.checkpoint.safetensors_format import DTYPE_SIZES

CHUNK_ELEMENTS = 1 << 17  # converted at a time: fits the L2 cache
IO_ELEMENTS = 1 << 20  # the most one convert() takes
NUMPY_FLOATS = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
# What torch's CPU casts write for a NaN: its vectorized float path gives 0xFFFF,
# its half -> bfloat16 path 0x7FC0.
BF16_NAN = {"F16": 0x7FC0}
BF16_NAN_DEFAULT = 0xFFFF


class Cast:
    """Converts chunks of `src` dtype bytes to `dst` dtype bytes."""

    def __init__(self, src: str, dst: str) -> None:
        self.src, self.dst = src, dst
        self.in_size, self.out_size = DTYPE_SIZES[src], DTYPE_SIZES[dst]
        self.input = np.empty(IO_ELEMENTS * self.in_size, np.uint8)  # for callers to read into
        self._f32 = np.empty(CHUNK_ELEMENTS, np.float32)
        self._u32 = np.empty(CHUNK_ELEMENTS, np.uint32)

    def convert(self, source: np.ndarray, output: np.ndarray) -> memoryview:
        """`source` (bytes of at most IO_ELEMENTS elements, as uint8) converted into
        `output` (an output_buffer)."""
        count = len(source) // self.in_size
        with np.errstate(all="ignore"):
            for first in range(0, count, CHUNK_ELEMENTS):
                n = min(CHUNK_ELEMENTS, count - first)
                raw = source[first * self.in_size : (first + n) * self.in_size]
                out = output[first * self.out_size : (first + n) * self.out_size]
                self._from_f32(self._to_f32(raw, n), out)
        return memoryview(output[: count * self.out_size])

    def _to_f32(self, raw: np.ndarray, count: int) -> np.ndarray:
        if self.src == "F32":
            return raw.view(np.float32)
        f32 = self._f32[:count]
        if self.src == "BF16":
            bits = f32.view(np.uint32)
            np.copyto(bits, raw.view(np.uint16), casting="unsafe")
            np.left_shift(bits, 16, out=bits)
        else:
            np.copyto(f32, raw.view(NUMPY_FLOATS[self.src]), casting="unsafe")
        return f32

    def _from_f32(self, values: np.ndarray, out: np.ndarray) -> None:
        if self.dst == "BF16":
            self._f32_to_bf16(values, out.view(np.uint16))
        else:
            np.copyto(out.view(NUMPY_FLOATS[self.dst]), values, casting="unsafe")

    def _f32_to_bf16(self, values: np.ndarray, out: np.ndarray) -> None:
        """Round to nearest even: (bits + 0x7FFF + lowest kept bit) >> 16."""
        bits = values.view(np.uint32)
        work = self._u32[: len(bits)]
        np.right_shift(bits, 16, out=work)
        np.bitwise_and(work, 1, out=work)
        np.add(work, bits, out=work)
        np.add(work, 0x7FFF, out=work)
        np.right_shift(work, 16, out=out, casting="unsafe")
        if np.isnan(np.max(values)):  # max propagates NaN: one cheap pass; NaN is rare in weights
            out[np.isnan(values)] = BF16_NAN.get(self.src, BF16_NAN_DEFAULT)


def output_buffer(dst: str) -> np.ndarray:
    """A buffer that holds one convert() output of `dst` elements."""
    return np.empty(IO_ELEMENTS * DTYPE_SIZES[dst], np.uint8)


_per_thread = threading.local()


def cast_for(src: str, dst: str) -> Cast:
    """This thread's Cast for a dtype pair, so that its buffers are allocated once."""
    casts = _per_thread.__dict__.setdefault("casts", {})
    if (src, dst) not in casts:
        casts[src, dst] = Cast(src, dst)
    return casts[src, dst]
