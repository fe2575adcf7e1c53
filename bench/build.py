"""`layersplice build` against `cp` of the same output bytes: wall time and peak RSS.

    python bench/build.py [--repeat 5] [--only base,all,double,cast] [--peers] [--against DIR]

Generates once, under bench/.cache/ (gitignored), random-weight Llama-shaped
teacher/student pairs, each student made of the teacher layers kept by
first=1 every=2 last=2 and carrying student_config.json. Every checkpoint is
written one layer shard at a time (plus an embeddings shard, a head shard and
the index), so neither this script nor anything it runs holds a whole model:

  base    teacher 16 layers, hidden 2048, intermediate 5632, 32 heads of 64,
          4 KV heads, vocab 32000, BF16 (~1.7 GB); student 9 layers (~1.1 GB)
  double  the same with 32 teacher layers (~3.1 GB); student 17 layers
  fp32    the base shapes in F32 (~3.4 GB + ~2.1 GB), for --dtype bf16

Scenarios: `base` builds the 11-layer interpolation (~1.2 GB), `double` its
21-layer counterpart (~2.1 GB), `cast` the 11-layer model from the fp32 pair
with --dtype bf16, `widen` the same from the BF16 pair with --dtype fp32
(numpy's BF16 -> F32, writing twice the bytes it reads), `all` runs
`build --all` on the base pair (8 sizes).

Each scenario times, alternately and --repeat times, in fresh processes:
  durable     `layersplice build` as shipped (fsync of every file before the
              rename)  vs  `cp -r` of its output followed by `sync` of every
              copied file
  page cache  the same CLI with its durability work made no-ops (early
              writeback and fsync; nothing else changes)  vs  plain `cp -r`
With --against DIR (another checkout of layersplice, its compiled cast built
in place: `python setup.py build_ext --inplace` there), the same durable build
also runs from DIR in each round, and the summary gives this checkout's time
as a ratio of DIR's: what a change costs, measured in the same run.
Before every timed command its input is read through (warm page cache: the
build's teacher and student, cp's source), and the other pairs are evicted
from the page cache so that writes find free memory on both sides alike.
Dirty pages of earlier steps are flushed with `sync` before every timed
command, and then 3 GiB of memory is touched and freed
(synthetic.warm_free_memory: on these VMs the host takes back free memory,
and whichever command next allocates it waits; --cold skips this). Wall time
is taken around the process; peak RSS is ru_maxrss and CPU time user + system
from /usr/bin/time (the
command alone, not this script). Ratios are of medians, from one run; the CPU
times are printed because other jobs on a shared machine move wall times.
"""

from __future__ import annotations

import argparse
import compileall
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import LlamaShape, evict, file_bytes, read_through, warm_free_memory, write_pair  # noqa: E402

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
PAIRS = {
    "base": (LlamaShape(layers=16), "BF16"),
    "double": (LlamaShape(layers=32), "BF16"),
    "fp32": (LlamaShape(layers=16), "F32"),
}
SCENARIOS = {  # name: (pair, build arguments, ratio target)
    "base": ("base", ["--layers", "11"], 1.25),
    "all": ("base", ["--all", "--name", "m"], 1.25),
    "double": ("double", ["--layers", "21"], 1.25),
    "cast": ("fp32", ["--layers", "11", "--dtype", "bf16"], 1.5),
    "widen": ("base", ["--layers", "11", "--dtype", "fp32"], 1.5),
}
RSS_LIMIT_MIB, RSS_GROWTH_MIB = 150, 20
WARM_BYTES = 3 << 30
FROM_CHECKOUT = (  # the CLI of the checkout named first on the command line (--against), whatever the cwd
    "import sys\n"
    "sys.path.insert(0, sys.argv.pop(1))\n"
    "from layersplice.cli.main import main\n"
    "main()\n"
)
NO_FSYNC = (  # the CLI with its durability work (early writeback, fsync) made no-ops
    "import layersplice.checkpoint.atomic as atomic, layersplice.checkpoint.writer as writer\n"
    "atomic.fsync_tree = atomic._fsync_dir = lambda path: None\n"
    "writer.start_writeback = lambda fd, offset, length: None\n"
    "from layersplice.cli.main import main\n"
    "main()\n"
)


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float  # user + system seconds of the command and its children
    peak_mib: float


def ensure_pair(name: str) -> tuple[Path, Path]:
    """The cached teacher and student of a pair, generated on first use."""
    shape, dtype = PAIRS[name]
    root = CACHE / name
    if not (root / "complete").is_file():
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating the {name} pair under {root} ...", flush=True)
        write_pair(root, shape, dtype)
        (root / "complete").touch()
    return root / "teacher", root / "student"


def measure(command: list[str], warm: bool) -> Run:
    """Wall time and peak RSS of one command, after flushing earlier dirty pages."""
    os.sync()
    if warm:
        warm_free_memory(WARM_BYTES)
    with tempfile.NamedTemporaryFile("r") as report, tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", report.name, *command],
                              stdout=subprocess.DEVNULL, stderr=errors)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{errors.read().decode()[-3000:]}")
        user, system, peak_kib = report.read().split()[-3:]
        return Run(wall, float(user) + float(system), int(peak_kib) / 1024)


def cp(source: Path, target: Path, durable: bool) -> list[str]:
    sync = ' && find "$1" -type f -exec sync {} + && sync "$1"' if durable else ""
    return ["sh", "-c", f'cp -r "$0" "$1"{sync}', str(source), str(target)]


def scenario(name: str, repeat: int, work: Path, warm: bool, against: Path | None = None) -> dict:
    pair, options, target = SCENARIOS[name]
    teacher, student = ensure_pair(pair)
    for other in CACHE.iterdir():  # keep memory free: the page cache holds this pair only
        if other.is_dir() and other.name != pair:
            evict(other)
    out, copy = work / name, work / f"{name}-cp"
    args = ["build", "--teacher", str(teacher), "--student", str(student), *options, "--out", str(out)]
    runs: dict[str, list[Run]] = {"durable": [], "cp+sync": [], "no-fsync": [], "cp": []}
    commands = [
        ("durable", [sys.executable, "-m", "layersplice", *args], None),
        ("cp+sync", cp(out, copy, durable=True), out),
        ("no-fsync", [sys.executable, "-c", NO_FSYNC, *args], None),
        ("cp", cp(out, copy, durable=False), out),
    ]
    if against is not None:
        runs["against"] = []
        commands.append(("against", [sys.executable, "-c", FROM_CHECKOUT, str(against), *args], None))
    for _ in range(repeat):
        for label, command, source in commands:
            shutil.rmtree(out if source is None else copy, ignore_errors=True)
            for cached in (teacher, student) if source is None else (source,):
                read_through(cached)
            runs[label].append(measure(command, warm))
    size = file_bytes(out)
    shutil.rmtree(out, ignore_errors=True), shutil.rmtree(copy, ignore_errors=True)
    med = {label: statistics.median(r.wall for r in values) for label, values in runs.items()}
    cpu = {label: statistics.median(r.cpu for r in values) for label, values in runs.items()}
    result = {
        "name": name, "bytes": size, "target": target, "median": med, "cpu": cpu,
        "ratio_durable": med["durable"] / med["cp+sync"], "ratio_page_cache": med["no-fsync"] / med["cp"],
        "ratio_against": med["durable"] / med["against"] if against is not None else None,
        "rss_mib": max(r.peak_mib for r in runs["durable"] + runs["no-fsync"]),
        "cp_rss_mib": max(r.peak_mib for r in runs["cp"] + runs["cp+sync"]),
        "walls": {label: [round(r.wall, 2) for r in values] for label, values in runs.items()},
    }
    print(
        f"{name:6} {size / 1e9:5.2f} GB | durable: build {med['durable']:6.2f} s, cp+sync {med['cp+sync']:6.2f} s,"
        f" ratio {result['ratio_durable']:.2f} | page cache: build {med['no-fsync']:5.2f} s, cp {med['cp']:5.2f} s,"
        f" ratio {result['ratio_page_cache']:.2f} | peak RSS build {result['rss_mib']:.0f} MiB, cp {result['cp_rss_mib']:.0f} MiB"
        + (f" | against {against}: {med['against']:.2f} s, this / that {result['ratio_against']:.2f}" if against else "")
        + f" | CPU s (user+sys) {', '.join(f'{k} {v:.2f}' for k, v in cpu.items())} | all walls {result['walls']}",
        flush=True,
    )
    return result


def peers(work: Path) -> None:
    """Optional peers on the base pair: a transformers load-splice-save script, mergekit if installed."""
    teacher, student = ensure_pair("base")
    read_through(teacher), read_through(student)
    out = work / "peer-transformers"
    shutil.rmtree(out, ignore_errors=True)
    run = measure([sys.executable, str(BENCH / "transformers_splice.py"), str(teacher), str(student), "11", str(out)], True)
    size = file_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    print(f"peer   transformers load -> splice -> save_pretrained, 11 layers ({size / 1e9:.2f} GB):"
          f" {run.wall:.2f} s, peak RSS {run.peak_mib:.0f} MiB (no fsync)", flush=True)
    if shutil.which("mergekit-yaml") is None:
        print("peer   mergekit: not installed here, not measured", flush=True)


def summary(results: dict[str, dict]) -> None:
    print("\ntarget                                          value      limit      result")
    for name, r in results.items():
        for kind in ("durable", "page_cache"):
            ratio = r[f"ratio_{kind}"]
            print(f"{name + ' wall / cp (' + kind.replace('_', ' ') + ')':46} {ratio:6.2f}x    {r['target']:.2f}x      {verdict(ratio <= r['target'])}")
    if "base" in results:
        rss = results["base"]["rss_mib"]
        print(f"{'peak RSS base 11L':46} {rss:5.0f} MiB   {RSS_LIMIT_MIB} MiB    {verdict(rss <= RSS_LIMIT_MIB)}")
        if "double" in results:
            growth = results["double"]["rss_mib"] - rss
            print(f"{'peak RSS double 21L minus base 11L':46} {growth:+5.0f} MiB   ±{RSS_GROWTH_MIB} MiB    {verdict(abs(growth) <= RSS_GROWTH_MIB)}")


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="Comma-separated scenarios.")
    parser.add_argument("--peers", action="store_true", help="Also time a transformers load-splice-save script.")
    parser.add_argument("--cold", action="store_true", help="Do not warm free memory before each command (see warm_free_memory).")
    parser.add_argument("--work", type=Path, default=CACHE / "out", help="Output directory (same file system as the cache).")
    parser.add_argument("--against", type=Path, help="Another layersplice checkout to time beside this one (durable).")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    # As `pip install` does: without bytecode (PYTHONDONTWRITEBYTECODE, a read-only
    # checkout) every run would compile layersplice from source first (~35 ms).
    compileall.compile_dir(BENCH.parent / "layersplice", quiet=1)
    print(f"{platform.node()}: python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, repeat {args.repeat}", flush=True)
    if args.against is not None:
        compileall.compile_dir(args.against / "layersplice", quiet=1)
    results = {name: scenario(name, args.repeat, args.work, not args.cold, args.against) for name in args.only.split(",")}
    if args.peers:
        peers(args.work)
    summary(results)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
