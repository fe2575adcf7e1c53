"""What a resume checkpoint records, and the checks that make --resume safe.

Every checkpoint directory holds a sealed `manifest.json`
(checkpoint/sealed_json.py): the step, the run's settings, the identity of
the teacher and of the initial student (the BLAKE3 of their config.json and
every safetensors file, so a model is the same model wherever it lies), and
the size and BLAKE3 of each file of the checkpoint, as build outputs record
theirs. --resume reads the manifest first and refuses other settings or
another teacher or student before anything is loaded; then it hashes every
file, so a truncated or corrupted checkpoint is refused instead of resumed
from garbage.
"""

from __future__ import annotations

from pathlib import Path

from layersplice.checkpoint.digest import CHECKSUM, blake3_file
from layersplice.checkpoint.sealed_json import read_sealed, write_sealed
from layersplice.distill.config import DistillConfig, DistillError, identity_changes
from layersplice.errors import CheckpointError
from layersplice.output.family import file_record

MANIFEST_NAME = "manifest.json"
FORMAT = "layersplice distill checkpoint"
FORMAT_VERSION = 1
ROLES = ("teacher", "student")


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose manifest or files do not match what was written."""


def model_identity(path: Path) -> dict[str, str]:
    """BLAKE3 of a model directory's config.json and safetensors files, by file name."""
    names = sorted(p.name for p in path.iterdir()
                   if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json"))
    return {name: blake3_file(path / name) for name in names}


def sources_identity(config: DistillConfig) -> dict[str, dict[str, str]]:
    return {"teacher": model_identity(config.teacher), "student": model_identity(config.student)}


def file_records(directory: Path, names: list[str]) -> dict[str, dict]:
    return {name: file_record(directory / name) for name in sorted(names)}


def seal_manifest(directory: Path, step: int, settings: dict, sources: dict, files: dict[str, dict]) -> None:
    write_sealed(directory / MANIFEST_NAME, {
        "format": FORMAT, "version": FORMAT_VERSION, "step": step,
        "settings": settings, "sources": sources, "files": files,
    })


def read_manifest(directory: Path) -> dict:
    """The checkpoint's sealed manifest; DamagedCheckpoint if it is missing, changed or not ours."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise DamagedCheckpoint(f"it has no {MANIFEST_NAME} (it was not written whole)")
    manifest, problem = read_sealed(path)
    if manifest is None:
        raise DamagedCheckpoint(problem)
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise DamagedCheckpoint(
            f"{MANIFEST_NAME} is not a version-{FORMAT_VERSION} distill checkpoint manifest"
        )
    return manifest


def damage(directory: Path, files: dict[str, dict], names: list[str]) -> str | None:
    """What is wrong with the named files of a checkpoint against their records, if anything."""
    for name in names:
        path, record = directory / name, files[name]
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record["size"]:
            return f"{name} holds {size:,} bytes where {record['size']:,} were written (truncated or changed)"
        if blake3_file(path) != record[CHECKSUM]:
            return f"{name} does not match its {CHECKSUM} digest in {MANIFEST_NAME} (its bytes changed)"
    return None


def is_intact(directory: Path) -> bool:
    try:
        files = read_manifest(directory)["files"]
    except DamagedCheckpoint:
        return False
    return damage(directory, files, sorted(files)) is None


def check_same_run(manifest: dict, config: DistillConfig, sources: dict) -> None:
    """Refuse to continue a run with other settings, or from another teacher or student."""
    changes = identity_changes(manifest["settings"], config.run_identity())
    if changes:
        raise DistillError(
            f"--resume: {config.out} holds a run with other settings ({', '.join(changes)}); "
            "resume with the same settings or choose a new --out"
        )
    for role in ROLES:
        then, now = manifest["sources"][role], sources[role]
        if then != now:
            path = getattr(config, role)
            raise DistillError(
                f"--resume: --{role} {path} is not the {role} the run in {config.out} started from "
                f"({_difference(then, now)}); give that {role}, or choose a new --out"
            )


def _difference(then: dict[str, str], now: dict[str, str]) -> str:
    if then.keys() != now.keys():
        return f"files then: {', '.join(then) or 'none'}; now: {', '.join(now) or 'none'}"
    name = next(n for n in then if then[n] != now[n])
    return f"{name}: {CHECKSUM} {then[name][:12]}... then, {now[name][:12]}... now"
