"""Execute plans: write interpolated checkpoints shard by shard, with provenance."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from layersplice import __version__
from layersplice.architectures.layout import Layout
from layersplice.checkpoint.atomic import Inputs, atomic_directory, output_lock, refuse_overlap
from layersplice.checkpoint.digest import CHECKSUM
from layersplice.checkpoint.sealed_json import read_sealed, write_sealed
from layersplice.checkpoint.source import INDEX_FILE, SIDE_FILES, Checkpoint
from layersplice.checkpoint.strict_json import write_json
from layersplice.checkpoint.writer import ProgressFn, SourceFiles, WriteItem, WrittenFile, write_shards
from layersplice.errors import LayerspliceError, OutputError
from layersplice.output.card import CARD_FILE, build_card, student_init_card
from layersplice.output.family import (
    MANIFEST_FILE, PARTS_DIR, PROVENANCE_FILE, FamilyProblem, assemble, file_record, refuse_other_sources, write_part,
)
from layersplice.output.verify import VerifyError, check_files, check_nothing_else
from layersplice.planning.alignment import STUDENT_CONFIG_NAME, Alignment
from layersplice.planning.blocks import Order
from layersplice.planning.configs import spliced_config
from layersplice.planning.job import Job
from layersplice.planning.plan import STUDENT, TEACHER, Plan, student_init_plan
from layersplice.planning.sizes import all_plans


@dataclass(frozen=True)
class Built:
    directory: Path
    plan: Plan
    files: dict[str, dict]


def write_model(
    job: Job, plan: Plan, directory: Path, choice: dict, shard_size: int, sources: SourceFiles,
    progress: ProgressFn | None = None, card_name: str | None = None,
) -> dict[str, dict]:
    """Write one splice into an existing empty directory; returns {file: {size, blake3}}.

    With `card_name` (the name the output will have) a model card is written too."""
    config, rewritten = spliced_config(job.layouts, plan, job.configs, job.cast)
    side_dir = job.checkpoint(plan.embeddings_from).directory
    card = build_card(job, plan, config, shard_size, card_name, choice) if card_name else None
    files = write_checkpoint(directory, plan.tensors, config, side_dir, shard_size, sources, progress, card)
    write_sealed(directory / PROVENANCE_FILE, _provenance(job, plan, choice, rewritten, files))
    return files


def write_checkpoint(
    directory: Path, tensors: Sequence[WriteItem], config: dict, side_dir: Path, shard_size: int,
    sources: SourceFiles, progress: ProgressFn | None, card: str | None = None, extra_json: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """Shards, index, config, the tokenizer/generation files of `side_dir`, the card and `extra_json`.

    Shards are hashed while they are written; the small files after, so that
    the record lists (and verify covers) every file."""
    shards = write_shards(directory, tensors, shard_size, sources, progress)
    write_json(directory / INDEX_FILE, _index(shards, sum(t.nbytes for t in tensors)))
    write_json(directory / "config.json", config)
    for name, data in (extra_json or {}).items():
        write_json(directory / name, data)
    for name in SIDE_FILES:
        if (side_dir / name).is_file():
            shutil.copyfile(side_dir / name, directory / name)
    if card is not None:
        (directory / CARD_FILE).write_text(card, encoding="utf-8")
    written = {shard.name: {"size": shard.size, CHECKSUM: shard.blake3} for shard in shards}
    return {p.name: written.get(p.name) or file_record(p) for p in sorted(directory.iterdir())}


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
        # The card loads the size from this Hub repo owner: a size kept from an earlier run must agree.
        **({"hub_owner": job.hub_owner} if job.hub_owner else {}),
        "files": files,
    }


def build_one(
    job: Job, plan: Plan, out: Path, choice: dict, shard_size: int, force: bool,
    progress: ProgressFn | None = None, card: bool = True, *, inputs: Inputs,
) -> Built:
    """One size into `out`; `inputs` are every path the command read (checkpoint.atomic.refuse_overlap)."""
    with atomic_directory(out, force, inputs=inputs) as tmp, SourceFiles() as sources:
        files = write_model(job, plan, tmp, choice, shard_size, sources, progress, out.name if card else None)
    return Built(out, plan, files)


def size_name(name: str, plan: Plan) -> str:
    return f"{name}-{plan.n_layers}L"


@dataclass(frozen=True)
class _FamilyRun:
    """What every size of one `build --all` run shares."""

    job: Job
    name: str
    shard_size: int
    order_record: dict
    card: bool
    sources: SourceFiles
    progress: ProgressFn | None
    on_size: Callable[[str, Plan, bool], None] | None
    inputs: tuple

    def size(self, keep: int | None, plan: Plan, parent: Path, force: bool | None = None) -> Built:
        """One size in parent/<name>-<L>L: kept if an intact earlier build of exactly it is there, else written.

        `force` None: parent is a temporary this run owns, so the size is written in place."""
        sub = size_name(self.name, plan)
        choice = {"layers": plan.n_layers, "keep": keep, **self.order_record}
        files = _verified_files(self.job, plan, choice, parent / sub, self.card)
        if self.on_size:
            self.on_size(sub, plan, files is not None)
        if files is not None:
            if self.progress:
                self.progress(plan.nbytes)
        elif force is None:
            shutil.rmtree(parent / sub, ignore_errors=True)
            (parent / sub).mkdir()
            files = self._write(plan, parent / sub, choice, sub)
        else:
            with atomic_directory(parent / sub, force, inputs=self.inputs) as tmp:
                files = self._write(plan, tmp, choice, sub)
        return Built(parent / sub, plan, {**files, PROVENANCE_FILE: file_record(parent / sub / PROVENANCE_FILE)})

    def _write(self, plan: Plan, directory: Path, choice: dict, sub: str) -> dict[str, dict]:
        return write_model(self.job, plan, directory, choice, self.shard_size, self.sources, self.progress,
                           sub if self.card else None)


def build_all(
    job: Job, order: Order, out: Path, name: str, shard_size: int, force: bool,
    progress: ProgressFn | None = None, on_size: Callable[[str, Plan, bool], None] | None = None,
    order_record: dict | None = None, plans: list[tuple[int | None, Plan]] | None = None, card: bool = True,
    *, inputs: Inputs,
) -> list[Built]:
    """Every size into out/<name>-<layers>L/, its part record and out/manifest.json.

    `plans` are all_plans(job, order) when the caller has them already. A run
    that was killed leaves its finished sizes in a hidden temporary; the next
    run adopts it and keeps each size whose files still verify.
    """
    plans = plans if plans is not None else all_plans(job, order)
    inputs = tuple(inputs)
    with atomic_directory(out, force, adopt=True, inputs=inputs) as tmp, SourceFiles() as sources:
        pinned = _pinned_sources(job, sources)
        run = _FamilyRun(job, name, shard_size, order_record or {"order": order}, card, sources, progress, on_size,
                         inputs)
        built = [run.size(keep, plan, tmp) for keep, plan in plans]
        _record_family(tmp, name, pinned, [b.directory.name for b in built])
    return [Built(out / b.directory.name, b.plan, b.files) for b in built]


def build_part(
    job: Job, order: Order, out: Path, name: str, shard_size: int, force: bool,
    plans: list[tuple[int | None, Plan]], progress: ProgressFn | None = None,
    on_size: Callable[[str, Plan, bool], None] | None = None, order_record: dict | None = None, card: bool = True,
    *, inputs: Inputs,
) -> list[Built]:
    """Some sizes of a family into OUT, beside sizes other runs wrote there (family.py).

    Each size appears atomically on its own; a size already in OUT is kept
    when it is intact and exactly this build, else it needs --force. Each
    finished size is recorded at once: this run's part record (named for its
    sizes so far, replacing its previous one) and the manifest derived from
    every part in OUT. So a run that fails or is killed on its third size
    leaves a family of its first two that verifies, and a rerun keeps them.
    OUT's lock is held throughout, so a second run into the same OUT (a whole
    family or a part) refuses while this one writes.
    """
    inputs = tuple(inputs)
    refuse_overlap(out, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out.parent}: {exc.strerror}") from None
    with output_lock(out), SourceFiles() as sources:
        pinned = _pinned_sources(job, sources)
        _check_family_dir(out, pinned)
        try:
            out.mkdir(exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {out}: {exc.strerror}") from None
        run = _FamilyRun(job, name, shard_size, order_record or {"order": order}, card, sources, progress, on_size,
                         inputs)
        built: list[Built] = []
        recorded = None
        for keep, plan in plans:
            try:
                built.append(run.size(keep, plan, out, force))
            except LayerspliceError as exc:
                if built:
                    done = ", ".join(b.directory.name for b in built)
                    raise type(exc)(f"{exc}; {done} finished, recorded in {out} (a rerun keeps them)") from None
                raise
            recorded = _record_family(out, name, pinned, [b.directory.name for b in built], replacing=recorded)
    return built


def _pinned_sources(job: Job, sources: SourceFiles) -> dict:
    """The sources as a family's part records name them: with the commit each Hub id resolved
    to, or the content digest of each local directory (read once, through the descriptors
    the build copies from)."""
    return {role: {**job.checkpoint(role).describe(), **job.checkpoint(role).identity(sources.fd)}
            for role in (TEACHER, STUDENT)}


def _check_family_dir(out: Path, pinned: dict) -> None:
    """Parts go into a new folder or into a family folder of the same sources; never into anything else."""
    if not out.exists():
        return
    if not out.is_dir() or out.is_symlink():
        raise OutputError(f"{out} is not a directory; choose another --out")
    is_family = (out / MANIFEST_FILE).is_file() or (out / PARTS_DIR).is_dir()
    if not is_family and any(not p.name.startswith(".") for p in out.iterdir()):
        raise OutputError(
            f"{out} exists and holds no layersplice family (no {MANIFEST_FILE}); "
            "choose an empty or new --out for a family in parts"
        )
    try:
        refuse_other_sources(out, pinned)
    except FamilyProblem as exc:
        raise OutputError(f"{out}: {exc}; choose another --out for these models") from None


def _record_family(out: Path, name: str, pinned: dict, directories: list[str], replacing: Path | None = None) -> Path:
    """This run's part record (replacing its record of fewer sizes), then the manifest of every part in OUT."""
    try:
        path = write_part(out, name, pinned, directories)
        if replacing is not None and replacing != path:
            replacing.unlink(missing_ok=True)
        assemble(out)
    except FamilyProblem as exc:
        raise OutputError(f"{out}: {exc}") from None
    return path


def _verified_files(job: Job, plan: Plan, choice: dict, directory: Path, card: bool) -> dict | None:
    """The recorded files of an earlier, intact build of exactly this size, else None."""
    provenance, problem = read_sealed(directory / PROVENANCE_FILE)
    if problem or (CARD_FILE in provenance["files"]) != card:
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


def init_student(
    teacher: Checkpoint, layout: Layout, alignment: Alignment, origin: str, out: Path,
    cast: str | None, shard_size: int, force: bool, progress: ProgressFn | None = None, card: bool = True,
    *, inputs: Inputs, hub_owner: str | None = None,
) -> Built:
    """Stream the kept teacher layers into a new student checkpoint (METHOD.md §2)."""
    plan = student_init_plan(layout, alignment, cast)
    config, rewritten = spliced_config({TEACHER: layout}, plan, {TEACHER: teacher.config}, cast)
    text = student_init_card(teacher, alignment, plan, config, cast, shard_size, out.name, hub_owner) if card else None
    with atomic_directory(out, force, inputs=inputs) as tmp, SourceFiles() as sources:
        files = write_checkpoint(tmp, plan.tensors, config, teacher.directory, shard_size, sources, progress, text,
                                 {STUDENT_CONFIG_NAME: alignment.student_config()})
        write_sealed(tmp / PROVENANCE_FILE, {
            "layersplice_version": __version__,
            "kind": "init-student",
            "sources": {TEACHER: teacher.describe()},
            "alignment": {"copied_teacher_layers": list(alignment.copied), "teacher_layers": alignment.n_teacher, "from": origin},
            "dtype": cast,
            "per_layer_config": rewritten,
            "parameters": plan.params,
            "files": files,
        })
    return Built(out, plan, files)
