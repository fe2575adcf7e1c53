"""`layersplice describe PATH`: a family description file for a checkpoint's family.

For a family layersplice infers from tensor names, the draft spells out what
inference found, in the schema of layersplice/architectures/__init__.py, so it
can be checked, edited and passed with --arch FILE (or added to the package).
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import yaml

from layersplice import schema
from layersplice.architectures import DESCRIPTION_DIR, Description
from layersplice.architectures.layout import Layout
from layersplice.checkpoint.source import Checkpoint
from layersplice.job import single_layout

INFERRED_SUFFIX = " (inferred)"


def draft_description(checkpoint: Checkpoint, layout: Layout) -> dict:
    """The description that gives this checkpoint its layout (validated against the schema)."""
    model_type = checkpoint.config.get("model_type") or layout.family.removesuffix(INFERRED_SUFFIX)
    draft: dict = {
        "name": model_type,
        "model_types": [model_type],
        "architectures": list(checkpoint.config.get("architectures") or []),
        "layer_prefixes": [layout.prefix],
        "num_layers_key": layout.num_layers_key,
        "embeddings": [re.escape(t.name) for t in layout.embeddings],
        "head": [re.escape(t.name) for t in layout.head],
    }
    token_embedding = _token_embedding(checkpoint, layout)
    if layout.tied_head_name and token_embedding:
        draft["tied_head"] = layout.tied_head_name
        draft["tied_embedding"] = re.escape(token_embedding)
    draft["per_layer_lists"] = list(layout.per_layer_lists)
    schema.load(Description, draft)
    return draft


def _token_embedding(checkpoint: Checkpoint, layout: Layout) -> str | None:
    """The embedding an LM head ties to: one row per vocabulary entry."""
    vocab = checkpoint.config.get("vocab_size")
    rows = [t for t in layout.embeddings if t.shape and t.shape[0] == vocab]
    chosen = rows or list(layout.embeddings)
    return chosen[0].name if chosen else None


def draft_text(checkpoint: Checkpoint, layout: Layout) -> str:
    if not layout.inferred:
        path = DESCRIPTION_DIR / f"{layout.family}.yaml"
        if path.is_file():
            return f"# {checkpoint.directory}: described by the built-in {path.name}\n{path.read_text()}"
    draft = draft_description(checkpoint, layout)
    header = (
        f"# Draft description of model_type {draft['name']!r}, inferred from the tensor names and\n"
        f"# config.json of {checkpoint.directory}. Check every entry: the embeddings and head\n"
        "# are what is left outside the layers, and per_layer_lists are the config lists with one\n"
        "# entry per layer. Use it with --arch FILE, or add it to layersplice/architectures/.\n"
    )
    return header + yaml.safe_dump(draft, sort_keys=False, width=100)


@click.command("describe")
@click.argument("path")
@click.option("--revision", help="Hub revision when PATH is a repo id.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the YAML to this file instead of printing it.")
def describe_command(path: str, revision: str | None, out: Path | None) -> None:
    """Print a family description (YAML) for the model at PATH.

    For a family layersplice does not describe but infers from `<prefix>.<i>.`
    tensor names, this is a draft to check and pass with --arch FILE. For a
    described family it prints the built-in description.

    \b
    Examples:
      layersplice describe ./my-model > my_family.yaml
      layersplice build --teacher T --student S --arch my_family.yaml --keep 4 --out mid
    """
    checkpoint, layout = single_layout(path, revision)
    text = draft_text(checkpoint, layout)
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"wrote {out}")
