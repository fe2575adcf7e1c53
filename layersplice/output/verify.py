"""Re-check a written output: sealed records, file checksums, headers, index,
config consistency, and optionally every tensor's bytes against its source."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from layersplice.architectures.layout import layout_of
from layersplice.checkpoint.digest import CHECKSUM, blake3_file
from layersplice.checkpoint.sealed_json import read_sealed
from layersplice.checkpoint.source import open_checkpoint
from layersplice.errors import LayerspliceError
from layersplice.output.family import MANIFEST_FILE, PROVENANCE_FILE, assembly_problem
HASHERS: dict[str, Callable[[Path], str]] = {CHECKSUM: blake3_file}


class VerifyError(LayerspliceError):
    """An output failed a check; the message names the first problem."""


@dataclass(frozen=True)
class Verified:
    directories: tuple[Path, ...]
    files: int
    bytes: int


def verify_path(path: Path, against_sources: bool = False) -> Verified:
    """Verify a single build output or a `build --all` directory."""
    if (path / MANIFEST_FILE).is_file():
        return _verify_all(path, against_sources)
    if (path / PROVENANCE_FILE).is_file():
        files, size = check_model_dir(path, against_sources)
        return Verified((path,), files, size)
    if not path.is_dir():
        raise VerifyError(f"{path}: no such directory")
    raise VerifyError(f"{path}: no {PROVENANCE_FILE} or {MANIFEST_FILE}; not a layersplice output")


def _verify_all(path: Path, against_sources: bool) -> Verified:
    manifest, problem = read_sealed(path / MANIFEST_FILE)
    if problem:
        raise VerifyError(f"{path}: {problem}")
    problem = assembly_problem(path, manifest)
    if problem:
        raise VerifyError(f"{path}: {problem}")
    dirs, files, size = [], 0, 0
    for entry in manifest["sizes"]:
        sub = path / entry["directory"]
        if Path(entry["directory"]).name != entry["directory"]:
            raise VerifyError(f"{path / MANIFEST_FILE}: size directory {entry['directory']!r} is not a plain name")
        check_files(sub, entry["files"], f"{path / MANIFEST_FILE}")
        n, b = check_model_dir(sub, against_sources)
        dirs.append(sub)
        files, size = files + n, size + b
    return Verified(tuple(dirs), files, size)


def check_files(directory: Path, recorded: dict, where: str) -> tuple[int, int]:
    total = 0
    for name, entry in sorted(recorded.items()):
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise VerifyError(f"{path}: listed in {where} but missing")
        algo, digest = _recorded_digest(entry)
        if algo not in HASHERS:
            raise VerifyError(f"{where}: unknown checksum kind {algo!r} for {name}")
        size = path.stat().st_size
        if entry.get("size") != size:
            raise VerifyError(f"{path}: {size} bytes but {where} records {entry['size']}")
        if HASHERS[algo](path) != digest:
            raise VerifyError(f"{path}: {algo} does not match {where}; the file is corrupted")
        total += size
    return len(recorded), total


def _recorded_digest(entry) -> tuple[str, str]:
    for algo in HASHERS:
        if isinstance(entry, dict) and isinstance(entry.get(algo), str):
            return algo, entry[algo]
    raise VerifyError(f"no known checksum recorded in {entry!r}")


def check_model_dir(directory: Path, against_sources: bool = False) -> tuple[int, int]:
    """All checks of one model directory; returns (files checked, bytes checked)."""
    provenance, problem = read_sealed(directory / PROVENANCE_FILE)
    if problem:
        raise VerifyError(f"{directory}: {problem}")
    count, size = check_files(directory, provenance["files"], str(directory / PROVENANCE_FILE))
    checkpoint = open_checkpoint(directory)  # strict headers and index
    layout = layout_of(checkpoint)  # config layer count agrees with the tensors
    layers = provenance.get("layers")
    if layers is not None and len(layers) != layout.n_layers:
        raise VerifyError(
            f"{directory}: {PROVENANCE_FILE} records {len(layers)} layers but the weights hold {layout.n_layers}"
        )
    if against_sources:
        from layersplice.output.verify_sources import check_against_sources

        check_against_sources(directory, provenance, checkpoint)
    return count, size
