"""`layersplice plan` on a synthetic checkpoint of 1000 layers in 100 shards.

    python bench/plan_bench.py [--repeat 3]

The teacher (1000 Llama layers, hidden 2048, 10 layers per shard: 100 layer
shards plus embeddings and head) and its reference-layout student (501
layers) have real safetensors headers and an index, but their data is a hole
made by truncate: ~90 GB apparent, nothing on disk. Generated once under
bench/.cache/plan/. Prints the median wall time of `layersplice plan`, as a
table and as --json (a fresh process each: interpreter start, imports, every
header read and checked, all 502 sizes planned and printed) against the 1 s
target.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import LlamaShape, write_pair  # noqa: E402

ROOT = Path(__file__).resolve().parent / ".cache" / "plan"
LAYERS, LAYERS_PER_SHARD = 1000, 10
TARGET_S = 1.0


def ensure_pair() -> tuple[Path, Path]:
    if not (ROOT / "complete").is_file():
        import shutil

        shutil.rmtree(ROOT, ignore_errors=True)
        write_pair(ROOT, LlamaShape(layers=LAYERS), "BF16", sparse=True, layers_per_shard=LAYERS_PER_SHARD)
        (ROOT / "complete").touch()
    return ROOT / "teacher", ROOT / "student"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    teacher, student = ensure_pair()
    shards = len(list(teacher.glob("*.safetensors")))
    command = [sys.executable, "-m", "layersplice", "plan", "--teacher", str(teacher), "--student", str(student)]
    print(f"teacher {LAYERS} layers in {shards} shards, student 501 layers: 502 sizes; load average {os.getloadavg()[0]:.1f}")
    for label, extra in (("table", []), ("--json", ["--json"])):
        times, cpu = [], []
        for _ in range(args.repeat):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run([*command, *extra], check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        median = statistics.median(times)
        print(f"layersplice plan ({label}): {median:.2f} s median of {[round(t, 2) for t in times]},"
              f" CPU {statistics.median(cpu):.2f} s (target < {TARGET_S:.0f} s: {'pass' if median < TARGET_S else 'FAIL'})")


if __name__ == "__main__":
    main()
