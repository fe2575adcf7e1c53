"""No test asserts elapsed time. A wall-clock limit is a benchmark: on a loaded
2-core machine the demo took 156 s against a 120 s assertion and failed a
fresh-clone CI run. Speed figures live in bench/ (as ratios against a baseline
measured in the same run) and bench/RESULTS.md.

Checked on the source of every test module: no clock is read (time.time,
perf_counter, monotonic, process_time, ..., timeit, datetime.now), no
hypothesis deadline is set, and every timeout or hang guard given as a number
is at least a minute (a guard against a hang, never a speed target)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
CLOCKS = {"time", "time_ns", "perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "process_time",
          "process_time_ns", "thread_time", "thread_time_ns"}
SHORTEST_GUARD_S = 60
GUARDS = {"timeout", "timeout_s", "hang_guard", "seconds"}  # keywords and callables that bound waiting


def _name(node: ast.AST) -> str:
    """a.b.c of an attribute chain or a name, else ''."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _clock_names(tree: ast.Module) -> set[str]:
    """The names a module can call a clock by: time.perf_counter, or perf_counter imported from time."""
    names = {f"time.{clock}" for clock in CLOCKS} | {"datetime.now", "datetime.datetime.now", "datetime.utcnow"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "time":
            names |= {alias.asname or alias.name for alias in node.names if alias.name in CLOCKS}
    return names


def _number(node: ast.AST) -> float | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) else None


def timing_in(path: Path) -> list[str]:
    """Every clock read, deadline and short guard in a test module, as 'file:line: what'."""
    tree = ast.parse(path.read_text(), str(path))
    clocks = _clock_names(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            found += [f"{where}: imports timeit" for module in modules if module == "timeit"]
        if not isinstance(node, ast.Call):
            continue
        called = _name(node.func)
        if called in clocks:
            found.append(f"{where}: reads the clock ({called})")
        for keyword in node.keywords:
            if keyword.arg == "deadline" and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is None):
                found.append(f"{where}: sets a hypothesis deadline")
            value = _number(keyword.value)
            if keyword.arg in GUARDS and value is not None and value < SHORTEST_GUARD_S:
                found.append(f"{where}: {keyword.arg}={value} is a speed target, not a hang guard")
        first = _number(node.args[0]) if node.args else None
        if called.split(".")[-1] in GUARDS and first is not None and first < SHORTEST_GUARD_S:
            found.append(f"{where}: {called}({first}) is a speed target, not a hang guard")
    return found


def test_no_test_reads_a_clock_sets_a_deadline_or_guards_with_less_than_a_minute():
    modules = sorted(p for p in TESTS.rglob("*.py") if p != Path(__file__).resolve())
    assert len(modules) > 30
    found = [item for path in modules for item in timing_in(path)]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(("source", "count"), [
    ("import time\nstart = time.perf_counter()\nassert time.perf_counter() - start < 120\n", 2),
    ("from time import monotonic as now\nx = now()\n", 1),
    ("from hypothesis import settings\n@settings(deadline=1000)\ndef test(): pass\n", 1),
    ("from hypothesis import settings\n@settings(deadline=None)\ndef test(): pass\n", 0),
    ("import subprocess\nsubprocess.run(['x'], timeout=5)\nsubprocess.run(['x'], timeout=300)\n", 1),
    ("with hang_guard(1.0):\n    pass\nwith hang_guard():\n    pass\n", 1),
    ("import timeit\n", 1),
    ("import time\ntime.sleep(0.001)\n", 0),
])
def test_the_check_finds_each_kind_of_timing(tmp_path, source, count):
    path = tmp_path / "test_sample.py"
    path.write_text(source)
    assert len(timing_in(path)) == count, timing_in(path)
