"""A local Hugging Face cache laid out as huggingface_hub lays it out, for offline hub-id tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def put_snapshot(cache: Path, repo_id: str, commit: str, source: Path, ref: str | None = "main") -> None:
    """Lay out files as huggingface_hub's cache does: blobs by hash, snapshot symlinks, refs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        if not blob.exists():
            blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
