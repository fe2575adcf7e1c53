"""fixtures/make_tiny_pair.py as a module, for the benches that train like the fixture
(its text, next-token loop, alignment and distill settings)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def make_tiny_pair():
    spec = importlib.util.spec_from_file_location("make_tiny_pair", FIXTURES / "make_tiny_pair.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
