"""JSON records that carry their own checksum, so a flipped byte anywhere shows.

The file must be exactly the canonical serialization (sorted keys, 2-space
indent) of its content, and `checksum` must be the sha256 of that content
serialized without the checksum. Any changed byte breaks one of the two.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CHECKSUM_KEY = "checksum"


def _canonical(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def seal(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != CHECKSUM_KEY}
    digest = hashlib.sha256(_canonical(body).encode()).hexdigest()
    return _canonical({**body, CHECKSUM_KEY: f"sha256:{digest}"})


def write_sealed(path: Path, data: dict) -> None:
    path.write_text(seal(data))


def read_sealed(path: Path) -> tuple[dict | None, str | None]:
    """(content, None) when intact, else (None, what is wrong)."""
    try:
        text = path.read_text(encoding="ascii")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path.name} is unreadable or not JSON ({exc.__class__.__name__})"
    if not isinstance(data, dict) or CHECKSUM_KEY not in data:
        return None, f"{path.name} has no checksum"
    if seal(data) != text:
        return None, f"{path.name} does not match its checksum (it was modified or corrupted)"
    return data, None
