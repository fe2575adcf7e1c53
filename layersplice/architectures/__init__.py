"""Model family descriptions, kept as data files beside this module.

A description names the layer prefix (a layer is every tensor under
``<prefix>.<i>.``), the embedding and head tensors, the tied-head pair, the
config key that counts layers and the per-layer config entries. Adding a family
is adding a YAML file here; the schema rejects unknown keys.

Two families pair across (a DistilBERT student of a BERT teacher) when both
name the same ``names_as`` family: ``rename`` maps a family's own layer and
head tensor names into that family's names (layersplice/architectures/names.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

from layersplice import schema
from layersplice.checkpoint.bounded import YAML_LIMIT, read_bounded
from layersplice.errors import ArchitectureError

DESCRIPTION_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Renames:
    """Own tensor names -> the names_as family's names.

    A key is a module path (it renames every tensor under it) or a full tensor
    name; keys under `layer` are relative to '<prefix>.<i>.'. A list value is a
    fused tensor: the named tensors' rows, concatenated in that order (Phi-3's
    qkv_proj is [q_proj, k_proj, v_proj]). Names not listed keep their name.
    """

    layer: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    head: dict[str, str | tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Description:
    """How one model family lays out its tensors and config (unknown keys are errors)."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...] = ()
    layer_prefixes: tuple[str, ...]
    num_layers_key: str
    embeddings: tuple[str, ...]
    head: tuple[str, ...]
    # The head tensor the loader ties to the embedding matching tied_embedding
    # (absent from tied checkpoints), and a pattern a checkpoint must match to
    # have that head at all (a bare BertModel has no MLM head to tie).
    tied_head: str | None = None
    tied_embedding: str | None = None
    tied_head_when: str | None = None
    # Further head tensors the loader ties to another head tensor together
    # with the embeddings (BERT: decoder.bias <- predictions.bias); written
    # out whenever the head is.
    tied_alongside: dict[str, str] = field(default_factory=dict)
    per_layer_lists: tuple[str, ...] = ()
    per_layer_thresholds: tuple[str, ...] = ()
    # Config lists of layer indices (Qwen-MoE mlp_only_layers): an output
    # layer is listed when the layer it came from was.
    per_layer_index_lists: tuple[str, ...] = ()
    # A period key (layers with (i + 1) % k == 0 are special) -> the index
    # list of exceptions: the splice sets the period to 1 and lists every
    # output layer whose source layer was off period.
    per_layer_periods: dict[str, str] = field(default_factory=dict)
    names_as: str | None = None
    rename: Renames = field(default_factory=Renames)
    # Older spellings of a name's last parts, read as the modern ones when
    # pairing across families (BERT's LayerNorm.gamma is LayerNorm.weight).
    legacy_names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("embeddings", "head", "tied_embedding", "tied_head_when"):
            for pattern in _as_tuple(getattr(self, key)):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"{key}: {pattern!r} is not a regular expression ({exc})") from None
        for period, exceptions in self.per_layer_periods.items():
            if exceptions not in self.per_layer_index_lists:
                raise ValueError(f"per_layer_periods: {period} -> {exceptions}, which is not in per_layer_index_lists")

    @property
    def canonical_family(self) -> str:
        """The family whose tensor names this family's renames lead to."""
        return self.names_as or self.name

    def is_embedding(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.embeddings)

    def is_head(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.head)


def _as_tuple(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if value is None else (value,) if isinstance(value, str) else value


def load_description(path: Path) -> Description:
    text = read_bounded(path, YAML_LIMIT, "family description", ArchitectureError)
    try:
        _, data = schema.parse_yaml(text)
        return schema.load(Description, data)
    except schema.YamlRefused as exc:
        raise ArchitectureError(f"{path}:{exc.line}: {exc.message}") from None
    except (yaml.YAMLError, schema.SchemaError) as exc:
        first = str(exc).splitlines()
        raise ArchitectureError(f"{path}: invalid description ({'; '.join(first[:3])})") from None


@cache
def builtin_description(name: str) -> Description | None:
    path = DESCRIPTION_DIR / f"{name}.yaml"
    return load_description(path) if path.is_file() else None


@cache
def builtin_descriptions() -> tuple[Description, ...]:
    return tuple(builtin_description(p.stem) for p in sorted(DESCRIPTION_DIR.glob("*.yaml")))


def find_description(config: dict) -> Description | None:
    """The description matching config.json's model_type, else its architectures.

    The file named after the model_type is tried first, so a build usually
    reads one description; the rest are read only when that one does not claim it.
    """
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if isinstance(model_type, str) and model_type.isidentifier():
        named = builtin_description(model_type)
        if named is not None and model_type in named.model_types:
            return named
    for description in builtin_descriptions():
        if model_type in description.model_types:
            return description
    for description in builtin_descriptions():
        if any(a in description.architectures for a in architectures):
            return description
    return None
