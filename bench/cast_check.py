"""What refusing NaN and infinity costs a cast: numpy conversions with and
without their per-chunk finiteness check, in one process, alternately.

    python bench/cast_check.py [--repeat 21]

For each dtype pair, converts 1M elements (one I/O chunk, the unit the build
hands to checkpoint/cast.py) of small normal weights, 5 times per sample,
with the check as shipped and with it replaced by a no-op; prints the median
G elements/s of each and the time ratio. The compiled F32 -> BF16 loop checks
in its own pass and cannot be switched off here: `bench/build.py --only cast
--against <checkout of the commit before>` measures it end to end.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from layersplice.checkpoint import cast
from layersplice.checkpoint.safetensors_format import DTYPE_SIZES

ELEMENTS = 1 << 20
# F32 -> F32 is the final step of a transfer into an F32 student (checkpoint/delta.py).
PAIRS = [("F32", "BF16"), ("F32", "F16"), ("BF16", "F32"), ("F16", "BF16"), ("BF16", "F16"), ("F16", "F32"),
         ("F32", "F32")]


def _source(dtype: str) -> bytes:
    values = (np.random.default_rng(0).standard_normal(ELEMENTS) * 0.02).astype(np.float32)
    if dtype == "BF16":
        return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return values.astype(np.float16 if dtype == "F16" else np.float32).tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    checked = cast.Cast.__dict__["_finite"]  # the staticmethod itself
    for src, dst in PAIRS:
        converter = cast.Cast(src, dst)
        converter._compiled = None  # the numpy path for every pair
        source, output = _source(src), bytearray(ELEMENTS * DTYPE_SIZES[dst])
        samples: dict[str, list[float]] = {"checked": [], "unchecked": []}
        for i in range(args.repeat):
            for label in ("checked", "unchecked") if i % 2 else ("unchecked", "checked"):
                cast.Cast._finite = checked if label == "checked" else staticmethod(lambda chunk, dtype: True)
                start = time.perf_counter()
                for _ in range(5):
                    converter.convert(source, output)
                samples[label].append((time.perf_counter() - start) / 5)
        cast.Cast._finite = checked
        with_check, without = statistics.median(samples["checked"]), statistics.median(samples["unchecked"])
        print(f"{src:>4} -> {dst:<4} numpy: {ELEMENTS / without / 1e9:.2f} G elements/s without the check, "
              f"{ELEMENTS / with_check / 1e9:.2f} with it: time x{with_check / without:.2f}")


if __name__ == "__main__":
    main()
