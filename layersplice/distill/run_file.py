"""`distill --config run.yaml`: every option of the command from a YAML file.

The file's keys are the command's long options with `-` as `_` (seq_len for
--seq-len, data for --data), checked as strictly as recipes: an unknown key,
or a value of the wrong type, is an error that names the file and the line.
The file's values become the command's defaults, so an option given on the
command line overrides it, as in TRL and torchtune. What the run was asked
for after merging is kept (RunSettings) for its sealed record and its card.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Literal

import click
from click.core import ParameterSource

from layersplice import schema
from layersplice.checkpoint.bounded import YAML_LIMIT, read_bounded
from layersplice.distill.config import DistillError, RunSettings

CONFIG_OPTION = "config"
TYPES = {click.INT: int, click.FLOAT: float, click.STRING: str}
ORIGINS = {ParameterSource.COMMANDLINE: "command line", ParameterSource.DEFAULT_MAP: "config file"}


def key_of(option: click.Option) -> str:
    """The option's key in a --config file: its long name with `-` as `_`."""
    long_name = next(opt for opt in option.opts if opt.startswith("--"))
    return long_name[2:].replace("-", "_")


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.name != CONFIG_OPTION]


def _kind(option: click.Option) -> Any:
    """The YAML value an option takes (an option the file leaves out keeps its default)."""
    if option.is_flag:
        return bool
    if option.multiple:  # a list, or one value for a list of one
        return list[str] | str
    if isinstance(option.type, click.Choice):
        return Literal[tuple(option.type.choices)]
    if isinstance(option.type, click.Path):
        return str
    return TYPES[option.type]


def file_schema(command: click.Command) -> type:
    """A dataclass with one optional field per option, for schema.load."""
    fields = [(key_of(o), _kind(o), dataclasses.field(default=None)) for o in _options(command)]
    return dataclasses.make_dataclass(f"{command.name}_file", fields, frozen=True)


def read_config_file(ctx: click.Context, _param: click.Parameter, path: Path | None) -> Path | None:
    """Eager callback of --config: the file's values become the defaults of the other options."""
    if path is None or ctx.resilient_parsing:
        return path
    text = read_bounded(path, YAML_LIMIT, "--config", DistillError)
    shape = "a --config file is a YAML mapping of option names to values, such as seq_len: 2048"
    loaded = schema.load_yaml(file_schema(ctx.command), text, path, DistillError, "config", shape,
                              hint=lambda exc: _suggestion(exc, ctx.command))
    given = {}
    for option in _options(ctx.command):
        value = getattr(loaded, key_of(option))
        if value is not None:
            given[option.name] = [value] if option.multiple and isinstance(value, str) else value
    ctx.default_map = {**(ctx.default_map or {}), **given}
    return path


def _suggestion(exc: schema.SchemaError, command: click.Command) -> str:
    """For an unknown key: the nearest option name, and where the names come from."""
    if exc.message != "unknown key":
        return ""
    near = difflib.get_close_matches(str(exc.path[-1]), [key_of(o) for o in _options(command)], n=1)
    guess = f"did you mean {near[0]}? " if near else ""
    return f"; {guess}the keys are the options of `layersplice {command.name} --help`, with - as _"


def run_settings(ctx: click.Context) -> RunSettings:
    """Every option's value after --config and the command line were merged, and where each came from."""
    values, origins = {}, {}
    for option in _options(ctx.command):
        key = key_of(option)
        values[key] = _plain(ctx.params[option.name])
        source = ctx.get_parameter_source(option.name)
        if source in ORIGINS:
            origins[key] = ORIGINS[source]
    config_file = ctx.params.get(CONFIG_OPTION)
    return RunSettings(values, origins, None if config_file is None else str(config_file))


def _plain(value: object) -> object:
    """A value as JSON holds it (paths as strings, tuples as lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value
