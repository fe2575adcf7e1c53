"""Strict loading of parsed YAML into frozen dataclasses (recipes, family descriptions).

Unknown keys, missing keys and values of the wrong type are errors that carry
where they are (a path of keys), so a misspelt field is never silently
dropped and a recipe error can name its line. Validation beyond types lives
in each dataclass's __post_init__ (a ValueError there is reported at that
object's path). pydantic did this before; importing it and building its
schemas cost ~70 ms at every start of the CLI, a fifth of the time of
copying a 1.2 GB checkpoint here (bench/RESULTS.md), for these few flat types.

Types understood: str, int, float, bool, None, Literal[...], unions (X | None),
tuple[T, ...], list[T], dict[K, V] and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union

import yaml

T = TypeVar("T")
# libyaml's parser where PyYAML has it: ~10x faster than the pure-Python one.
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
Location = tuple[typing.Union[str, int], ...]


class YamlRefused(ValueError):
    """A YAML feature these files never need and that could be abused, at a 1-based line."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(f"line {line}: {message}")


def refuse_anchors(text: str) -> None:
    """Refuse anchors (&name) and aliases (*name) before anything is built.

    Aliases let ~40 lines stand for billions of values (a "billion laughs"
    document): checking such a value against a schema never ends. Recipes
    and descriptions never need them. The node tree does not keep anchors,
    so the event stream is read (linear in the text, ~10 µs for a recipe).
    """
    for event in yaml.parse(text, Loader=SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise YamlRefused(
                event.start_mark.line + 1,
                "YAML anchors and aliases (&name, *name) are not accepted here; write the value out in full",
            )


def yaml_problem(exc: yaml.YAMLError) -> tuple[int | None, str]:
    """(1-based line or None, what is wrong on one line) of a YAML parse error."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
    return (mark.line + 1 if mark else None), " ".join(str(problem).split())


def parse_yaml(text: str) -> tuple[yaml.Node | None, object]:
    """The document's node tree (for line numbers) and its value; anchors and aliases refused."""
    refuse_anchors(text)
    loader = SafeLoader(text)
    try:
        node = loader.get_single_node()
        return node, None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def line_of(node: yaml.Node | None, loc: Location) -> int:
    """1-based line of the YAML node at a schema error's location."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def load_yaml(cls: type[T], text: str, path: Path, error: type[Exception], what: str, shape: str,
              hint: Callable[[SchemaError], str] | None = None) -> T:
    """`text`, the YAML file at `path`, checked and converted into `cls`.

    Every problem raises `error` as one line that names path:line: anchors,
    bad YAML, a top level that is not a mapping (`shape` says what it must
    be), and schema errors (at the key's path, or `what` for the whole file,
    followed by what `hint` adds)."""
    try:
        root, data = parse_yaml(text)
    except YamlRefused as exc:
        raise error(f"{path}:{exc.line}: {exc.message}") from None
    except yaml.YAMLError as exc:
        line, problem = yaml_problem(exc)
        raise error(f"{path}{f':{line}' if line else ''}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {shape}")
    try:
        return load(cls, data)
    except SchemaError as exc:
        field_name = ".".join(str(p) for p in exc.path) or what
        more = hint(exc) if hint else ""
        raise error(f"{path}:{line_of(root, exc.path)}: {field_name}: {exc.message}{more}") from None


class SchemaError(ValueError):
    """A value that does not fit the schema, at `path` (keys and list indices)."""

    def __init__(self, path: Location, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{'.'.join(str(p) for p in path) or 'top level'}: {message}")


def load(cls: type[T], data: object) -> T:
    """`data` checked against the dataclass `cls` and converted into it (lists become tuples
    where the field is a tuple)."""
    return _convert(cls, data, ())


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(kind: Any, value: object, path: Location) -> Any:
    if dataclasses.is_dataclass(kind):
        return _dataclass(kind, value, path)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        return _union(args, value, path)
    if origin is Literal:
        if value in args and all(type(value) is type(a) for a in args if a == value):
            return value
        raise SchemaError(path, f"must be one of {', '.join(repr(a) for a in args)}, not {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise SchemaError(path, f"expected a list, got {_shown(value)}")
        items = [_convert(args[0], item, (*path, i)) for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(path, f"expected a mapping, got {_shown(value)}")
        return {_convert(args[0], k, (*path, k)): _convert(args[1], v, (*path, k)) for k, v in value.items()}
    return _scalar(kind, value, path)


def _dataclass(cls: type, value: object, path: Location) -> Any:
    if not isinstance(value, dict):
        raise SchemaError(path, f"expected a mapping of keys, got {_shown(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            raise SchemaError((*path, key), "unknown key")
    hints = _hints(cls)
    arguments = {}
    for name, field in fields.items():
        if name in value:
            arguments[name] = _convert(hints[name], value[name], (*path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SchemaError((*path, name), "required key is missing")
    try:
        return cls(**arguments)
    except ValueError as exc:
        raise SchemaError(path, str(exc)) from None


def _union(options: tuple, value: object, path: Location) -> Any:
    for option in options:
        try:
            return _convert(option, value, path)
        except SchemaError:
            continue
    raise SchemaError(path, f"expected {' or '.join(_name(o) for o in options)}, got {_shown(value)}")


SCALARS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
# PyYAML reads YAML 1.1, where 3e-4 (no dot) is a string; YAML 1.2 and every
# config a user copies from (TRL, torchtune) mean the number.
EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _scalar(kind: Any, value: object, path: Location) -> Any:
    if kind is Any:
        return value
    if kind not in SCALARS:
        raise TypeError(f"schema type {kind!r} is not supported")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str) and EXPONENT_NUMBER.fullmatch(value):
        return float(value)
    # bool is an int in Python, never in a schema.
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise SchemaError(path, f"expected {SCALARS[kind]}, got {_shown(value)}")


def _name(kind: Any) -> str:
    if kind in SCALARS:
        return SCALARS[kind]
    origin = typing.get_origin(kind)
    if origin in (tuple, list):
        return "a list"
    if origin is dict:
        return "a mapping"
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(kind))
    return "a mapping of keys" if dataclasses.is_dataclass(kind) else str(kind)


def _shown(value: object) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
