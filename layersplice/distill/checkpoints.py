"""What a run leaves in --out: resume checkpoints and the final student directory.

A resume checkpoint is a folder, checkpoints/step-NNNNNNN, that appears whole
or not at all (checkpoint/atomic.py: rank 0 creates it under a temporary
name and renames it once everything is written):

    state/          the student's weights and AdamW state as
                    torch.distributed.checkpoint writes them, each process
                    its own shards (sharded.py);
    loop_state.pt   step, scheduler, data position and every rank's RNG
                    (torch.save of tensors and plain values, read back with
                    weights_only=True);
    manifest.json   sealed: the size and BLAKE3 of every file, the settings
                    and the identity of the teacher and the initial student
                    (checkpoint_record.py).

Every process writes its shards into the folder and, on resume, reads the
pieces it needs, so with several processes --out must be on a filesystem
that all of them see (as for any DCP checkpoint). The files are hashed by all
processes at once, each a share, both after a save and before a resume.

The newest two checkpoints are kept: when the last one is damaged (a disk
fault, a copy cut short), --resume says so and names the one before it.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from layersplice.checkpoint.atomic import atomic_directory, refuse_overlap
from layersplice.distill import parallel, sharded
from layersplice.distill.checkpoint_record import (
    DamagedCheckpoint,
    check_same_run,
    damage,
    file_records,
    is_intact,
    read_manifest,
    seal_manifest,
    sources_identity,
)
from layersplice.distill.config import DistillConfig
from layersplice.distill.parallel import World
from layersplice.errors import OutputError

CHECKPOINT_DIR = "checkpoints"
STATE_DIR = "state"
LOOP_STATE = "loop_state.pt"
KEEP = 2  # checkpoints kept: the newest, and the one before it in case the newest is damaged
_STEP_NAME = re.compile(r"step-\d{7}")


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINT_DIR / f"step-{step:07d}"


def saved_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries of an interrupted save are hidden files)."""
    folder = out / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _STEP_NAME.fullmatch(p.name))


def check_out(config: DistillConfig) -> None:
    """Refuse to mix a new run into an old one, or to write into an input (before anything is loaded or written)."""
    out = config.out
    data = config.data
    local_dataset = [("--dataset", Path(data.dataset))] if data.dataset and Path(data.dataset).exists() else []
    refuse_overlap(out, [("the teacher", config.teacher), ("the student", config.student),
                         *(("--data", path) for path in data.files), *local_dataset])
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a directory")
    if config.resume:
        if not saved_checkpoints(out):
            older = any((out / CHECKPOINT_DIR).glob("step-*.pt"))
            why = " but checkpoints of an earlier layersplice, which carry no digest to verify" if older else ""
            raise OutputError(
                f"--resume: {out / CHECKPOINT_DIR} holds no checkpoint{why}; run without --resume "
                "(add --save-every N to write checkpoints)"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise OutputError(
            f"--out {out} is not empty; pass --resume to continue the run in it, or choose a new directory"
        )


@dataclass(frozen=True)
class _InFlight:
    """A save whose shards are being written into `folder`, the temporary that `publish` renames."""

    step: int
    folder: Path
    future: Future | None  # the asynchronous write; None when the save was synchronous
    publish: contextlib.ExitStack  # rank 0's atomic_directory; empty elsewhere


class Checkpoints:
    """A run's checkpoints: the teacher and student they record, the verified
    checkpoint it resumes, and the save still being written, if any."""

    def __init__(self, config: DistillConfig, sources: dict | None, resume_from: Path | None,
                 group: torch.distributed.ProcessGroup | None) -> None:
        self.config = config
        self.sources = sources  # None when the run writes and reads no checkpoint
        self.resume_from = resume_from
        self.group = group  # the process group of asynchronous saves
        self.in_flight: _InFlight | None = None

    def settle(self, world: World, wait: bool = False) -> None:
        """Collective: publish the save in flight once every rank has written its part
        (now, with `wait`; otherwise only if all have finished)."""
        saving = self.in_flight
        if saving is None:
            return
        if not wait and not parallel.on_all_ranks(saving.future is None or saving.future.done(), world):
            return
        self.in_flight = None
        failure = None
        try:
            if saving.future is not None:
                saving.future.result()
        except sharded.SAVE_ERRORS as error:  # every rank must learn that one rank failed
            failure = sharded.failure_reason(error)
        failures = [f for f in parallel.gather_objects(failure, world) if f]
        if failures:
            raise _abandoned(saving, self.config, failures[0])
        names = parallel.broadcast_object(_files_under(saving.folder) if world.is_main else None, world)
        records = _hashed_by_all(saving.folder, names, world)
        if world.is_main:
            seal_manifest(saving.folder, saving.step, self.config.run_identity(), self.sources, records)
            saving.publish.close()  # fsync, then rename into place
            for older in saved_checkpoints(self.config.out)[:-KEEP]:
                shutil.rmtree(older)
        parallel.barrier(world)


def begin(config: DistillConfig, world: World) -> Checkpoints:
    """Collective, before the models load: check --out, identify the teacher and student
    and, on --resume, verify the newest checkpoint (settings, sources, every byte)."""
    sources, latest, files = parallel.decided_on_main(lambda: _examine(config), world)
    if latest is not None:
        names = sorted(files)
        problem = damage(latest, files, names[world.rank::world.size])
        problems = [p for p in parallel.gather_objects(problem, world) if p]
        if problems:
            def refuse() -> None:
                raise _damaged(latest, problems[0])

            parallel.decided_on_main(refuse, world)
    group = sharded.checkpoint_group(world) if config.save_every else None
    return Checkpoints(config, sources, latest, group)


def _examine(config: DistillConfig) -> tuple[dict | None, Path | None, dict | None]:
    """On rank 0: (sources, the checkpoint to resume, its file records)."""
    check_out(config)
    if not (config.resume or config.save_every):
        return None, None, None
    sources = sources_identity(config)
    if not config.resume:
        return sources, None, None
    latest = saved_checkpoints(config.out)[-1]
    try:
        manifest = read_manifest(latest)
    except DamagedCheckpoint as error:
        raise _damaged(latest, str(error)) from None
    check_same_run(manifest, config, sources)
    return sources, latest, manifest["files"]


def _damaged(latest: Path, problem: str) -> DamagedCheckpoint:
    older = [path for path in saved_checkpoints(latest.parent.parent) if path < latest]
    intact = next((path for path in reversed(older) if is_intact(path)), None)
    if intact is None:
        advice = "no earlier checkpoint is intact; start again without --resume in a new --out"
    else:
        advice = (f"the one before it, {intact.name}, is intact: move {latest.name} out of {latest.parent} "
                  "and run again with --resume to continue from there")
    return DamagedCheckpoint(f"--resume: checkpoint {latest} is damaged: {problem}; {advice}")


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _hashed_by_all(folder: Path, names: list[str], world: World) -> dict[str, dict]:
    """Collective: the records of `names`, each rank hashing its share."""
    records: dict[str, dict] = {}
    for share in parallel.gather_objects(file_records(folder, names[world.rank::world.size]), world):
        records |= share
    return dict(sorted(records.items()))


def _rng_state(world: World) -> dict:
    cuda = torch.cuda.get_rng_state(world.device) if world.device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def save_checkpoint(
    config: DistillConfig, step: int, student, optimizer, scheduler, data_state: dict, world: World,
    checkpoints: Checkpoints,
) -> None:
    """Collective: write checkpoints/step-N, each rank its own shards; asynchronously on CUDA
    (published by a later `settle`), at once elsewhere. The oldest checkpoints are dropped."""
    checkpoints.settle(world, wait=True)  # one save in flight at a time
    loop_state = {"step": step, "scheduler": scheduler.state_dict(), "data": data_state,
                  "rng": parallel.gather_objects(_rng_state(world), world)}
    publish = contextlib.ExitStack()

    def open_folder() -> Path:
        folder = publish.enter_context(atomic_directory(checkpoint_dir(config.out, step), inputs=()))
        torch.save(loop_state, folder / LOOP_STATE)
        return folder

    folder = parallel.decided_on_main(open_folder, world)
    saving = _InFlight(step, folder, None, publish)
    try:
        future = sharded.save(sharded.state_of(student, optimizer), folder / STATE_DIR, world, checkpoints.group)
    except sharded.SAVE_ERRORS as error:  # DCP raises on every rank when one rank fails
        raise _abandoned(saving, config, sharded.failure_reason(error)) from None
    checkpoints.in_flight = replace(saving, future=future)
    checkpoints.settle(world, wait=future is None)


def _abandoned(saving: _InFlight, config: DistillConfig, reason: str) -> OutputError:
    """Remove the temporary of a save that failed (on rank 0); the error to raise on every rank."""
    saving.publish.__exit__(RuntimeError, RuntimeError(reason), None)
    return OutputError(f"writing checkpoint step {saving.step} in {config.out} failed ({reason}); "
                       "the checkpoints before it are kept: free space or fix --out, then run again with --resume")


def load_checkpoint(config: DistillConfig, student, optimizer, scheduler, world: World,
                    checkpoints: Checkpoints) -> dict:
    """Collective: restore model, optimizer, scheduler and RNG from the verified checkpoint,
    whatever number of processes wrote it; return {"step", "data"} for the loop."""
    folder = checkpoints.resume_from
    sharded.load(student, optimizer, folder / STATE_DIR, world)
    loop_state = torch.load(folder / LOOP_STATE, map_location="cpu", weights_only=True)
    scheduler.load_state_dict(loop_state["scheduler"])
    rngs = loop_state["rng"]
    rng = rngs[world.rank] if world.rank < len(rngs) else rngs[0]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and world.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], world.device)
    return {"step": loop_state["step"], "data": loop_state["data"]}
