"""JSON records that carry their own checksum, so a flipped byte anywhere shows.

The file must be exactly the canonical serialization (sorted keys, 2-space
indent) of its content, and `checksum` must be the sha256 of that content
serialized without the checksum. Any changed byte breaks one of the two.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from layersplice.checkpoint.strict_json import dumps

CHECKSUM_KEY = "checksum"


def _canonical(data: dict) -> str:
    return dumps(data) + "\n"


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


def replace_sealed(path: Path, data: dict) -> None:
    """Write a sealed record beside its final name, flush it, then rename it into place.

    For records that live directly in a folder others write too (a family's
    manifest and part records): a reader sees the old record or the new one,
    never half of one.
    """
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="ascii") as handle:
            handle.write(seal(data))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
