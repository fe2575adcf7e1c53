"""Text every Python installation has: the docstrings of fixed standard-library modules.

The tiny fixture pair (fixtures/make_tiny_pair.py) is trained on stdlib
docstrings and comments with the files of the modules below left out, so
their text is held out from that training; the two sets are disjoint so that
calibrating --order kl and measuring it use different text.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

HELD_OUT_MODULES = (
    "shlex", "statistics", "string", "textwrap", "tokenize", "typing", "uuid", "warnings", "weakref", "zipfile",
)
CALIBRATION_MODULES = (
    "pathlib", "pprint", "queue", "random", "sched", "selectors", "shutil", "socket", "subprocess", "tarfile",
)


def module_docstrings(name: str) -> str:
    """The module's, its classes' and its functions' docstrings, in source order."""
    origin = importlib.util.find_spec(name).origin
    tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    docs = sorted((getattr(n, "lineno", 0), ast.get_docstring(n)) for n in nodes if ast.get_docstring(n))
    return "\n".join(doc for _, doc in docs)


def write_documents(path: Path, modules: tuple[str, ...]) -> Path:
    """One JSON line per module, {"text": its docstrings}."""
    path.write_text("".join(json.dumps({"text": module_docstrings(name)}) + "\n" for name in modules))
    return path
