"""The strict loader behind recipes and family descriptions, and the built-in descriptions it loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from layersplice import schema
from layersplice.architectures import DESCRIPTION_DIR, builtin_descriptions, find_description, load_description
from layersplice.errors import ArchitectureError


@dataclass(frozen=True)
class Inner:
    count: int
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must not be negative")


@dataclass(frozen=True)
class Outer:
    title: str
    inner: Inner = field(default_factory=lambda: Inner(0))
    mode: Literal["a", "b"] = "a"
    ratio: float = 1.0
    either: str | tuple[str, ...] | None = None
    table: dict[str, int] = field(default_factory=dict)


def test_valid_data_is_converted_lists_to_tuples_and_ints_to_floats():
    loaded = schema.load(Outer, {"title": "t", "inner": {"count": 2, "names": ["x", "y"]}, "ratio": 2,
                                 "either": ["p", "q"], "table": {"k": 3}})
    assert loaded == Outer("t", Inner(2, ("x", "y")), "a", 2.0, ("p", "q"), {"k": 3})
    assert isinstance(loaded.ratio, float)
    assert schema.load(Outer, {"title": "t", "either": "p"}).either == "p"


@pytest.mark.parametrize(
    ("data", "path", "fragment"),
    [
        ({"title": "t", "titel": "x"}, ("titel",), "unknown key"),
        ({"title": "t", "inner": {"count": 1, "nmaes": []}}, ("inner", "nmaes"), "unknown key"),
        ({}, ("title",), "required key is missing"),
        ({"title": 3}, ("title",), "expected a string, got int 3"),
        ({"title": "t", "inner": {"count": True}}, ("inner", "count"), "expected an integer, got bool True"),
        ({"title": "t", "inner": {"count": 1, "names": ["x", 2]}}, ("inner", "names", 1), "expected a string"),
        ({"title": "t", "mode": "c"}, ("mode",), "must be one of 'a', 'b'"),
        ({"title": "t", "either": 5}, ("either",), "expected a string or a list or null, got int 5"),
        ({"title": "t", "table": {"k": "v"}}, ("table", "k"), "expected an integer"),
        ({"title": "t", "inner": {"count": -1}}, ("inner",), "count must not be negative"),
        (["title"], (), "expected a mapping of keys, got list"),
    ],
)
def test_every_mistake_is_named_with_where_it_is(data, path, fragment):
    with pytest.raises(schema.SchemaError) as raised:
        schema.load(Outer, data)
    assert raised.value.path == path
    assert fragment in raised.value.message


def test_each_builtin_description_is_named_after_its_file_and_claims_its_own_model_types():
    """find_description reads <model_type>.yaml first, which must give what a scan of all files gives."""
    seen: dict[str, str] = {}
    for description in builtin_descriptions():
        assert (DESCRIPTION_DIR / f"{description.name}.yaml").is_file()
        for model_type in description.model_types:
            assert model_type not in seen, (model_type, seen.get(model_type), description.name)
            seen[model_type] = description.name
    for model_type, name in seen.items():
        assert find_description({"model_type": model_type}).name == name


def test_a_misspelt_key_in_an_arch_file_is_refused_with_its_name(tmp_path):
    text = (DESCRIPTION_DIR / "llama.yaml").read_text().replace("per_layer_lists:", "per_layer_list:")
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ArchitectureError) as raised:
        load_description(path)
    assert str(raised.value) == f"{path}: invalid description (per_layer_list: unknown key)"
