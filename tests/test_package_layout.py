"""The package's layout: no import cycles between its files (lazy imports inside
functions included), dependencies that point away from the command line, and a
small package root."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "layersplice"
ROOT_MODULE_LIMIT = 8


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _with_packages(name: str, known: dict[str, Path]) -> set[str]:
    """The module and every package above it: importing a.b.c runs a/__init__ and a/b/__init__ too."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known.keys()


def _imported(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        return set().union(*(_with_packages(alias.name, known) for alias in node.names))
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join([*anchor, *([base] if base else [])])
    found = _with_packages(base, known)
    for alias in node.names:
        found |= _with_packages(f"{base}.{alias.name}", known)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the layersplice modules it imports anywhere in its source (top level or inside functions)."""
    known = _modules()
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        targets = set().union(*(_imported(node, name, is_package, known) for node in ast.walk(tree)))
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_sees_lazy_imports_and_reports_a_cycle():
    source = "def f():\n    from layersplice.b import x\n"
    known = {"layersplice": Path("__init__.py"), "layersplice.a": Path("a.py"), "layersplice.b": Path("b.py")}
    tree = ast.parse(source)
    lazy = set().union(*(_imported(node, "layersplice.a", False, known) for node in ast.walk(tree)))
    assert lazy == {"layersplice", "layersplice.b"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_layersplice_modules():
    graph = import_graph()
    assert len(graph) > 40, "the checker found too few modules to be looking at the package"
    assert cycles(graph) == []


def test_the_package_root_holds_at_most_eight_modules():
    root = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(root) <= ROOT_MODULE_LIMIT, f"package root modules: {root}"


def test_nothing_below_the_command_line_imports_it():
    graph = import_graph()
    # distill/command.py and distill/tokenize_command.py are the command lines of distill and tokenize
    # (loaded lazily by the group): they may take the shared option definitions from cli/options.py, so
    # that they are defined once.
    edge = {"layersplice.__main__", "layersplice.distill.command", "layersplice.distill.tokenize_command"}
    offenders = {
        module: sorted(t for t in targets if t.startswith("layersplice.cli"))
        for module, targets in graph.items()
        if not module.startswith("layersplice.cli") and module not in edge
    }
    assert {m: t for m, t in offenders.items() if t} == {}


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m.endswith("_commands")))
def test_command_modules_do_not_import_each_other(module):
    imported = import_graph()[module]
    assert sorted(t for t in imported if t.endswith("_commands")) == []
