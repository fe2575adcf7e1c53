"""Execute plans: write interpolated checkpoints shard by shard, with provenance."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from layersplice import __version__
from layersplice.architectures.layout import Layout
from layersplice.checkpoint.atomic import Inputs, atomic_directory
from layersplice.checkpoint.digest import CHECKSUM, blake3_file
from layersplice.checkpoint.sealed_json import read_sealed, write_sealed
from layersplice.checkpoint.source import INDEX_FILE, SIDE_FILES, Checkpoint
from layersplice.checkpoint.writer import ProgressFn, SourceFiles, WrittenFile, write_shards
from layersplice.output.verify import MANIFEST_FILE, PROVENANCE_FILE, VerifyError, check_files, check_nothing_else
from layersplice.planning.alignment import STUDENT_CONFIG_NAME, Alignment
from layersplice.planning.blocks import Order
from layersplice.planning.configs import spliced_config
from layersplice.planning.job import Job
from layersplice.planning.plan import TEACHER, Plan, student_init_plan
from layersplice.planning.sizes import all_plans


@dataclass(frozen=True)
class Built:
    directory: Path
    plan: Plan
    files: dict[str, dict]


def write_model(
    job: Job, plan: Plan, directory: Path, choice: dict, shard_size: int, sources: SourceFiles,
    progress: ProgressFn | None = None,
) -> dict[str, dict]:
    """Write one splice into an existing empty directory; returns {file: {size, blake3}}."""
    config, rewritten = spliced_config(job.layouts, plan, job.configs, job.cast)
    side_dir = job.checkpoint(plan.embeddings_from).directory
    files = write_checkpoint(directory, plan, config, side_dir, shard_size, sources, progress)
    write_sealed(directory / PROVENANCE_FILE, _provenance(job, plan, choice, rewritten, files))
    return files


def write_checkpoint(
    directory: Path, plan: Plan, config: dict, side_dir: Path, shard_size: int, sources: SourceFiles,
    progress: ProgressFn | None,
) -> dict[str, dict]:
    """Shards, index, config and the tokenizer/generation files of `side_dir`.

    Shards are hashed while they are written; the small files after."""
    shards = write_shards(directory, plan.tensors, shard_size, sources, progress)
    _write_json(directory / INDEX_FILE, _index(shards, plan.nbytes))
    _write_json(directory / "config.json", config)
    for name in SIDE_FILES:
        if (side_dir / name).is_file():
            shutil.copyfile(side_dir / name, directory / name)
    written = {shard.name: {"size": shard.size, CHECKSUM: shard.blake3} for shard in shards}
    return {p.name: written.get(p.name) or _file_record(p) for p in sorted(directory.iterdir())}


def _index(shards: list[WrittenFile], total_size: int) -> dict:
    weight_map = {name: shard.name for shard in shards for name in shard.tensors}
    return {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}


def _provenance(job: Job, plan: Plan, choice: dict, rewritten: dict[str, str], files: dict) -> dict:
    alignment = job.pair.alignment
    return {
        "layersplice_version": __version__,
        "sources": job.describe_sources(),
        "alignment": {
            "copied_teacher_layers": list(alignment.copied),
            "teacher_layers": alignment.n_teacher,
            "from": job.alignment_origin,
        },
        "choice": choice,
        "patched_blocks": sorted(plan.patched),
        "embeddings_from": plan.embeddings_from,
        "head_from": plan.head_from,
        "tied_embeddings": plan.tied,
        "dtype": job.cast,
        "layers": [
            {"index": l.index, "model": l.model, "source_layer": l.source_layer, "block": l.block}
            for l in plan.layers
        ],
        "per_layer_config": rewritten,
        "parameters": plan.params,
        "files": files,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_one(
    job: Job, plan: Plan, out: Path, choice: dict, shard_size: int, force: bool, progress: ProgressFn | None = None,
    *, inputs: Inputs,
) -> Built:
    """One size into `out`; `inputs` are every path the command read (checkpoint.atomic.refuse_overlap)."""
    with atomic_directory(out, inputs=inputs, force=force) as tmp, SourceFiles() as sources:
        files = write_model(job, plan, tmp, choice, shard_size, sources, progress)
    return Built(out, plan, files)


def size_name(name: str, plan: Plan) -> str:
    return f"{name}-{plan.n_layers}L"


def build_all(
    job: Job, order: Order, out: Path, name: str, shard_size: int, force: bool,
    progress: ProgressFn | None = None, on_size: Callable[[str, Plan, bool], None] | None = None,
    order_record: dict | None = None, plans: list[tuple[int | None, Plan]] | None = None, *, inputs: Inputs,
) -> list[Built]:
    """Every size into out/<name>-<layers>L/ plus out/manifest.json.

    `plans` are all_plans(job, order) when the caller has them already. A run
    that was killed leaves its finished sizes in a hidden temporary; the next
    run adopts it and keeps each size whose files still verify.
    """
    built = []
    with atomic_directory(out, inputs=inputs, force=force, adopt=True) as tmp, SourceFiles() as sources:
        for keep, plan in plans if plans is not None else all_plans(job, order):
            sub = size_name(name, plan)
            choice = {"layers": plan.n_layers, "keep": keep, **(order_record or {"order": order})}
            files = _verified_files(job, plan, choice, tmp / sub)
            if on_size:
                on_size(sub, plan, files is not None)
            if files is None:
                shutil.rmtree(tmp / sub, ignore_errors=True)
                (tmp / sub).mkdir()
                files = write_model(job, plan, tmp / sub, choice, shard_size, sources, progress)
            elif progress:
                progress(plan.nbytes)
            files = {**files, PROVENANCE_FILE: _file_record(tmp / sub / PROVENANCE_FILE)}
            built.append(Built(out / sub, plan, files))
        write_sealed(tmp / MANIFEST_FILE, _manifest(job, built))
    return built


def _file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, CHECKSUM: blake3_file(path)}


def _verified_files(job: Job, plan: Plan, choice: dict, directory: Path) -> dict | None:
    """The recorded files of an earlier, intact build of exactly this size, else None."""
    provenance, problem = read_sealed(directory / PROVENANCE_FILE)
    if problem:
        return None
    _, rewritten = spliced_config(job.layouts, plan, job.configs, job.cast)
    expected = _provenance(job, plan, choice, rewritten, provenance["files"])
    if {k: v for k, v in provenance.items() if k != "checksum"} != expected:
        return None
    try:
        check_nothing_else(directory, [*provenance["files"], PROVENANCE_FILE], str(directory / PROVENANCE_FILE))
        check_files(directory, provenance["files"], str(directory / PROVENANCE_FILE))
    except VerifyError:
        return None
    return provenance["files"]


def _manifest(job: Job, built: list[Built]) -> dict:
    return {
        "layersplice_version": __version__,
        "sources": job.describe_sources(),
        "sizes": [
            {
                "directory": b.directory.name,
                "layers": b.plan.n_layers,
                "parameters": b.plan.params,
                "bytes": sum(f["size"] for f in b.files.values()),
                "patched_blocks": sorted(b.plan.patched),
                "files": b.files,
            }
            for b in built
        ],
    }


def init_student(
    teacher: Checkpoint, layout: Layout, alignment: Alignment, origin: str, out: Path,
    cast: str | None, shard_size: int, force: bool, progress: ProgressFn | None = None, *, inputs: Inputs,
) -> Built:
    """Stream the kept teacher layers into a new student checkpoint (METHOD.md §2)."""
    plan = student_init_plan(layout, alignment, cast)
    config, rewritten = spliced_config({TEACHER: layout}, plan, {TEACHER: teacher.config}, cast)
    with atomic_directory(out, inputs=inputs, force=force) as tmp, SourceFiles() as sources:
        # Written first, so that the record lists it (verify fails on unlisted files).
        _write_json(tmp / STUDENT_CONFIG_NAME, alignment.student_config())
        files = write_checkpoint(tmp, plan, config, teacher.directory, shard_size, sources, progress)
        write_sealed(tmp / PROVENANCE_FILE, {
            "layersplice_version": __version__,
            "kind": "init-student",
            "sources": {TEACHER: {"reference": teacher.reference, "revision": teacher.revision, "directory": str(teacher.directory)}},
            "alignment": {"copied_teacher_layers": list(alignment.copied), "teacher_layers": alignment.n_teacher, "from": origin},
            "dtype": cast,
            "per_layer_config": rewritten,
            "parameters": plan.params,
            "files": files,
        })
    return Built(out, plan, files)
