"""Recipes and family descriptions are parsed in bounded memory, without hanging:
YAML anchors and aliases are refused before anything is built (a "billion
laughs" document never reaches the schema), files over a generous size cap
and files that are not regular files are refused with one line, and random
documents give a Recipe/Description or a one-line user error, never a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from layersplice.architectures import DESCRIPTION_DIR, Description, load_description
from layersplice.checkpoint.bounded import YAML_LIMIT
from layersplice.errors import ArchitectureError, RecipeError
from layersplice.planning.recipe import Recipe, load_recipe

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BOMB_LEVELS = 10
# Stops a hang (the expanded bomb ran for more than 30 s); never a speed target: how fast
# a refusal is, is measured by bench/parse_bounds.py against a plain recipe's load.
HANG_GUARD_S = 60


def billion_laughs(head: str, key: str) -> str:
    """`head`, then `key` holding a list whose items each repeat the one before nine times:
    9**9 (~387 million) strings from 12 lines, all under a key the schema knows."""
    lines = [head, f"{key}:", '  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, BOMB_LEVELS):
        lines.append(f"  - &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


RECIPE_HEAD = f"name: bomb\nteacher: {FIXTURES / 'tiny-teacher'}\nstudent: {FIXTURES / 'tiny-student'}"


class Hung(Exception):
    pass


@contextmanager
def hang_guard(seconds: float = HANG_GUARD_S):
    """Fail instead of waiting forever: a deadline on a hang, not a speed target."""

    def expire(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _cli(*args: str) -> subprocess.CompletedProcess:
    # The timeout only stops a hang (the refusal itself takes milliseconds).
    return subprocess.run([sys.executable, "-m", "layersplice", *args], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_an_alias_bomb_recipe_is_refused_before_it_expands(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(billion_laughs(RECIPE_HEAD, "description"))
    with hang_guard(), pytest.raises(RecipeError) as raised:
        load_recipe(recipe)
    assert str(raised.value) == (
        f"{recipe}:5: YAML anchors and aliases (&name, *name) are not accepted here; write the value out in full"
    )
    out = tmp_path / "out"
    line = _one_error_line(_cli("build", "--recipe", str(recipe), "--keep", "2", "--out", str(out)))
    assert f"{recipe}:5: YAML anchors and aliases" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


def test_an_alias_bomb_description_is_refused_before_it_expands(tmp_path):
    arch = tmp_path / "bomb.yaml"
    arch.write_text(billion_laughs((DESCRIPTION_DIR / "llama.yaml").read_text(), "legacy_names"))
    with hang_guard(), pytest.raises(ArchitectureError, match="anchors and aliases"):
        load_description(arch)
    line = _one_error_line(_cli("inspect", str(FIXTURES / "tiny-teacher"), "--arch", str(arch)))
    assert f"{arch}:" in line and "anchors and aliases" in line


@pytest.mark.parametrize("text", ["name: &n tiny\n", "alignment: &rule {first: 1, every: 2, last: 2}\n",
                                  "teacher: a\nstudent: *a\n"], ids=["anchor-on-a-scalar", "anchor-on-a-mapping", "alias"])
def test_anchors_are_refused_even_when_harmless(tmp_path, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError, match="anchors and aliases"):
        load_recipe(recipe)


def test_an_oversized_recipe_is_refused_with_its_size(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{RECIPE_HEAD}\ndescription: '{'x' * YAML_LIMIT}'\n")
    line = _one_error_line(_cli("plan", "--recipe", str(recipe)))
    assert f"{recipe}: 1.05 MB is more than the 1.05 MB a recipe may hold" in line


def test_an_oversized_description_is_refused(tmp_path):
    arch = tmp_path / "big.yaml"
    arch.write_text((DESCRIPTION_DIR / "llama.yaml").read_text() + "#" * YAML_LIMIT + "\n")
    line = _one_error_line(_cli("inspect", str(FIXTURES / "tiny-teacher"), "--arch", str(arch)))
    assert "a family description may hold" in line


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_recipe_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path, kind):
    path = Path("/dev/zero")
    if kind == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)  # opening it for reading would wait for a writer
    line = _one_error_line(_cli("plan", "--recipe", str(path)))
    assert f"{path}: not a regular file" in line


# --- property tests: any document gives a value or a one-line user error, never a hang ---

_keys = st.sampled_from(["name", "teacher", "student", "alignment", "first", "every", "last", "order", "out",
                         "dtype", "description", "model_types", "layer_prefixes", "rename", "layer", "x"])
_scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=6)
_documents = st.recursive(_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(_keys, c, max_size=5),
                          max_leaves=20)


@st.composite
def alias_graphs(draw) -> str:
    """A document that defines anchors and refers back to them, at random depths and widths."""
    n = draw(st.integers(1, 6))
    lines = [f"a0: &a0 {draw(st.sampled_from(['lol', '[1, 2]', '{k: v}']))}"]
    for i in range(1, n):
        refs = draw(st.lists(st.integers(0, i - 1), min_size=1, max_size=9))
        lines.append(f"a{i}: &a{i} [{', '.join(f'*a{r}' for r in refs)}]")
    lines.append(f"{draw(_keys)}: *a{n - 1}")
    return "\n".join(lines) + "\n"


def _written(text: str):
    directory = tempfile.TemporaryDirectory()
    path = Path(directory.name) / "doc.yaml"
    path.write_text(text)
    return directory, path


def _loads_or_refuses_in_one_line(loader, text: str, error: type[Exception], kind: type) -> None:
    directory, path = _written(text)
    with directory, hang_guard():
        try:
            value = loader(path)
        except error as exc:
            assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)
        else:
            assert isinstance(value, kind)


@given(st.text(max_size=200))
def test_any_text_is_a_recipe_or_a_one_line_recipe_error(text):
    _loads_or_refuses_in_one_line(lambda p: load_recipe(p)[0], text, RecipeError, Recipe)


@given(_documents)
def test_any_yaml_document_is_a_recipe_or_a_one_line_recipe_error(document):
    _loads_or_refuses_in_one_line(lambda p: load_recipe(p)[0], yaml.safe_dump(document), RecipeError, Recipe)


@given(_documents)
def test_any_yaml_document_is_a_description_or_a_one_line_architecture_error(document):
    _loads_or_refuses_in_one_line(load_description, yaml.safe_dump(document), ArchitectureError, Description)


@given(alias_graphs())
def test_every_document_with_aliases_is_refused(text):
    for loader, error in ((load_recipe, RecipeError), (load_description, ArchitectureError)):
        directory, path = _written(text)
        with directory, hang_guard(), pytest.raises(error, match="anchors and aliases"):
            loader(path)
