"""JSON that every parser reads: Python's json module writes NaN and Infinity,
which are not JSON (RFC 8259), and strict parsers (jq, JavaScript's
JSON.parse, Go, Rust's serde_json) reject the whole document. Every record
layersplice writes and every --json document goes through here, with a value
that is not finite written as null, as JavaScript does."""

from __future__ import annotations

import json
import math
from pathlib import Path


def finite(value):
    """`value` with every NaN or infinite float in it, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def dumps(data, sort_keys: bool = True) -> str:
    """Indented JSON text with no NaN or Infinity literal."""
    return json.dumps(finite(data), indent=2, sort_keys=sort_keys, ensure_ascii=True, allow_nan=False)


def write_json(path: Path, data: dict) -> None:
    path.write_text(dumps(data) + "\n")
