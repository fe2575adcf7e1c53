"""`layersplice demo` wall time: a benchmark, not a test (tests/test_demo.py keeps
what the demo must show; a wall-clock assertion there failed a fresh-clone CI
run on a loaded machine).

    python bench/demo_time.py [--repeat 3]

Each repeat runs, alternately and in fresh processes, the demo
(`layersplice demo --out TMP --json`, after one untimed run that warms the
page cache) and a baseline of fixed one-thread torch work that load on a
shared machine slows alike (the demo's own work is one-thread torch): 2,000
products of 512 x 512 float32 matrices. Prints the median wall and CPU time
of each (/usr/bin/time; CPU time moves far less than wall time on a shared
machine), their ratios, the demo's peak RSS, and the demo's median against
the 120 s the test suite used to assert.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 120
BASELINE = (
    "import torch\n"
    "torch.set_num_threads(1)\n"
    "a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))\n"
    "for _ in range(2000):\n"
    "    b = a @ a\n"
)


def timed(command: list[str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one fresh process, by /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%U %S %M", *command], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        user, system, rss_kib = report.read().split()
    return wall, float(user) + float(system), int(rss_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory() as work:
        def demo(i: int) -> list[str]:
            return [sys.executable, "-m", "layersplice", "demo", "--out", str(Path(work) / f"demo-{i}"), "--json"]

        timed(demo(-1))  # page cache, compiled bytecode
        runs = {"demo": [], "baseline": []}
        for i in range(args.repeat):
            runs["demo"].append(timed(demo(i)))
            runs["baseline"].append(timed([sys.executable, "-c", BASELINE]))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    medians = {name: statistics.median(r[0] for r in found) for name, found in runs.items()}
    cpu = {name: statistics.median(r[1] for r in found) for name, found in runs.items()}
    for name, found in runs.items():
        print(f"{name}: wall {medians[name]:.1f} s median of {[round(r[0], 1) for r in found]}, "
              f"CPU {cpu[name]:.1f} s, peak RSS {max(r[2] for r in found):.0f} MiB")
    print(f"demo / baseline: wall {medians['demo'] / medians['baseline']:.2f}x, CPU {cpu['demo'] / cpu['baseline']:.2f}x; "
          f"demo wall / the former {BUDGET_S} s limit: {medians['demo'] / BUDGET_S:.2f}")


if __name__ == "__main__":
    main()
