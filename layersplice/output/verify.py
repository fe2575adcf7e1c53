"""Re-check a written output: sealed records, file checksums, no unlisted files,
headers, index, config consistency, and optionally every tensor's bytes
against its source."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterable

from layersplice.architectures.layout import layout_of
from layersplice.checkpoint.atomic import is_working_file
from layersplice.checkpoint.digest import CHECKSUM, blake3_file
from layersplice.checkpoint.sealed_json import read_sealed
from layersplice.checkpoint.source import open_checkpoint
from layersplice.checkpoint.token_shards import (
    RECORD_FILE, TRAIN_FILE, VAL_FILE, is_token_dir, largest_token, open_token_shards,
)
from layersplice.errors import CheckpointError, LayerspliceError
from layersplice.output.family import DISTILLED, MANIFEST_FILE, PARTS_DIR, PROVENANCE_FILE, assembly_problem
from layersplice.planning.alignment import STUDENT_CONFIG_NAME, read_student_config

HASHERS: dict[str, Callable[[Path], str]] = {CHECKSUM: blake3_file}


class VerifyError(LayerspliceError):
    """An output failed a check; the message names the first problem."""


@dataclass(frozen=True)
class Verified:
    directories: tuple[Path, ...]
    files: int
    bytes: int


def verify_path(path: Path, against_sources: bool = False, allow_extra: Iterable[str] = ()) -> Verified:
    """Verify a single build output or a `build --all` directory.

    `allow_extra`: paths relative to `path` (README.md, m-4L/NOTES.md) that
    may be there although no record lists them; any other unlisted entry fails.
    """
    allowed = frozenset(Path(p).as_posix() for p in allow_extra)
    if is_token_dir(path):
        if against_sources:
            raise VerifyError(
                f"{path} is a tokenize output: --against-sources compares model weights with their sources; "
                "verify it without that option (its checksums cover every byte)"
            )
        files, size = check_token_dir(path, allowed)
        return Verified((path,), files, size)
    if (path / MANIFEST_FILE).is_file():
        return _verify_all(path, against_sources, allowed)
    if (path / PROVENANCE_FILE).is_file():
        files, size = check_model_dir(path, against_sources, allowed)
        return Verified((path,), files, size)
    if not path.is_dir():
        raise VerifyError(f"{path}: no such directory")
    raise VerifyError(f"{path}: no {PROVENANCE_FILE} or {MANIFEST_FILE}; not a layersplice output")


def _verify_all(path: Path, against_sources: bool, allowed: frozenset[str]) -> Verified:
    manifest, problem = read_sealed(path / MANIFEST_FILE)
    if problem:
        raise VerifyError(f"{path}: {problem}")
    problem = assembly_problem(path, manifest)
    if problem:
        raise VerifyError(f"{path}: {problem}")
    names = [entry["directory"] for entry in manifest["sizes"]]
    for name in names:
        if Path(name).name != name:
            raise VerifyError(f"{path / MANIFEST_FILE}: size directory {name!r} is not a plain name")
    check_nothing_else(path, [MANIFEST_FILE, PARTS_DIR, *names], str(path / MANIFEST_FILE), allowed)
    dirs, files, size = [], 0, 0
    for entry in manifest["sizes"]:
        sub = path / entry["directory"]
        check_files(sub, entry["files"], f"{path / MANIFEST_FILE}")
        n, b = check_model_dir(sub, against_sources, allowed, prefix=f"{entry['directory']}/")
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


def check_nothing_else(
    directory: Path, listed: Collection[str], where: str, allowed: frozenset[str] = frozenset(), prefix: str = ""
) -> None:
    """Fail on the first entry of `directory` that `listed` does not name.

    An unlisted model.safetensors beside recorded shards would be loaded
    instead of them (loaders look for the single file first), so an output
    holds only what its record lists, the extras the user allowed by their
    path relative to the verified directory (`prefix` + name), and the
    hidden working files of a layersplice run writing beside it.
    """
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if name in listed or is_working_file(name) or f"{prefix}{name}" in allowed:
            continue
        raise VerifyError(
            f"{entry}: not listed in {where}; a loader may read it in place of the recorded files. "
            f"Remove it, or pass --allow-extra {prefix}{name} if it belongs there"
        )


def _recorded_digest(entry) -> tuple[str, str]:
    for algo in HASHERS:
        if isinstance(entry, dict) and isinstance(entry.get(algo), str):
            return algo, entry[algo]
    raise VerifyError(f"no known checksum recorded in {entry!r}")


def _check_distilled(directory: Path, provenance: dict, n_layers: int) -> None:
    """A distilled student's student_config.json is the alignment its record names, one teacher layer a layer."""
    recorded = provenance["alignment"]["copied_teacher_layers"]
    copied = read_student_config(directory)
    if copied is None or list(copied) != recorded:
        raise VerifyError(
            f"{directory / STUDENT_CONFIG_NAME}: gives copied teacher layers {copied and list(copied)}, "
            f"but {PROVENANCE_FILE} records {recorded}"
        )
    if len(copied) != n_layers:
        raise VerifyError(f"{directory}: {PROVENANCE_FILE} records {len(copied)} layers but the weights hold {n_layers}")


def check_model_dir(
    directory: Path, against_sources: bool = False, allowed: frozenset[str] = frozenset(), prefix: str = ""
) -> tuple[int, int]:
    """All checks of one model directory; returns (files checked, bytes checked)."""
    provenance, problem = read_sealed(directory / PROVENANCE_FILE)
    if problem:
        raise VerifyError(f"{directory}: {problem}")
    where = str(directory / PROVENANCE_FILE)
    check_nothing_else(directory, [*provenance["files"], PROVENANCE_FILE], where, allowed, prefix)
    count, size = check_files(directory, provenance["files"], where)
    checkpoint = open_checkpoint(directory)  # strict headers and index
    layout = layout_of(checkpoint)  # config layer count agrees with the tensors
    layers = provenance.get("layers")
    if layers is not None and len(layers) != layout.n_layers:
        raise VerifyError(
            f"{directory}: {PROVENANCE_FILE} records {len(layers)} layers but the weights hold {layout.n_layers}"
        )
    if provenance.get("kind") == DISTILLED:
        _check_distilled(directory, provenance, layout.n_layers)
    if against_sources:
        from layersplice.output.verify_sources import check_against_sources

        check_against_sources(directory, provenance, checkpoint)
    return count, size


def check_token_dir(directory: Path, allowed: frozenset[str] = frozenset()) -> tuple[int, int]:
    """All checks of a `layersplice tokenize` output; returns (files checked, bytes checked).

    Beyond the record's seal and the files' sizes and checksums, every token id
    must lie inside the tokenizer's vocabulary that the record names."""
    try:
        shards = open_token_shards(directory)
    except CheckpointError as exc:
        raise VerifyError(str(exc)) from None
    where = str(directory / RECORD_FILE)
    recorded = shards.record["files"]
    if sorted(recorded) != sorted((TRAIN_FILE, VAL_FILE)):
        raise VerifyError(f"{where}: lists {sorted(recorded)}, not {TRAIN_FILE} and {VAL_FILE}")
    check_nothing_else(directory, [*recorded, RECORD_FILE], where, allowed)
    count, size = check_files(directory, recorded, where)
    vocabulary = shards.record["tokenizer"]["vocab_size"]
    for name, tokens in ((TRAIN_FILE, shards.train()), (VAL_FILE, shards.val())):
        largest = largest_token(tokens)
        if largest >= vocabulary:
            raise VerifyError(
                f"{directory / name}: token id {largest} lies outside the {vocabulary}-token vocabulary "
                f"{where} records"
            )
    return count, size
