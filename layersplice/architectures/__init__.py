"""Model family descriptions, kept as data files beside this module.

A description names the layer prefix (a layer is every tensor under
``<prefix>.<i>.``), the embedding and head tensors, the tied-head pair, the
config key that counts layers and the per-layer config entries. Adding a family
is adding a YAML file here; the schema rejects unknown keys.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from layersplice.errors import ArchitectureError

DESCRIPTION_DIR = Path(__file__).parent


class Description(BaseModel):
    """How one model family lays out its tensors and config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...] = ()
    layer_prefixes: tuple[str, ...]
    num_layers_key: str
    embeddings: tuple[str, ...]
    head: tuple[str, ...]
    tied_head: str | None = None
    tied_embedding: str | None = None
    per_layer_lists: tuple[str, ...] = ()
    per_layer_thresholds: tuple[str, ...] = ()

    @field_validator("embeddings", "head")
    @classmethod
    def _patterns_compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            re.compile(pattern)
        return patterns

    def is_embedding(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.embeddings)

    def is_head(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.head)


def load_description(path: Path) -> Description:
    try:
        data = yaml.safe_load(path.read_text())
        return Description.model_validate(data)
    except (yaml.YAMLError, ValidationError, re.error) as exc:
        first = str(exc).splitlines()
        raise ArchitectureError(f"{path}: invalid description ({'; '.join(first[:3])})") from None


@cache
def builtin_descriptions() -> tuple[Description, ...]:
    return tuple(load_description(p) for p in sorted(DESCRIPTION_DIR.glob("*.yaml")))


def find_description(config: dict) -> Description | None:
    """The description matching config.json's model_type, else its architectures."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    for description in builtin_descriptions():
        if model_type in description.model_types:
            return description
    for description in builtin_descriptions():
        if any(a in description.architectures for a in architectures):
            return description
    return None
