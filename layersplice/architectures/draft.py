"""A family description file for a checkpoint's family (`layersplice describe`).

For a family layersplice infers from tensor names, the draft spells out what
inference found, in the schema of layersplice/architectures/__init__.py, so it
can be checked, edited and passed with --arch FILE (or added to the package).
"""

from __future__ import annotations

import re

import yaml

from layersplice import schema
from layersplice.architectures import DESCRIPTION_DIR, Description
from layersplice.architectures.layout import Layout
from layersplice.checkpoint.source import Checkpoint

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
