"""What a run leaves in --out: resume checkpoints and the final student directory.

A resume checkpoint is a directory, checkpoints/step-NNNNNNN, written whole or
not at all (checkpoint/atomic.py): state.pt, one torch.save file of tensors
and plain Python values (read back with weights_only=True) holding the full
model and optimizer state, scheduler, data position and every rank's RNG;
and a sealed manifest (checkpoint_record.py) with the file's BLAKE3, the
settings and the identity of the teacher and initial student. Only rank 0
writes; on resume rank 0 reads and the other ranks receive what they need by
broadcast, so --out need not be on a filesystem that every node sees.

The newest two checkpoints are kept: when the last one is damaged (a disk
fault, a copy cut short), --resume says so and names the one before it.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from layersplice.checkpoint.atomic import atomic_directory, refuse_overlap
from layersplice.checkpoint.source import SIDE_FILES
from layersplice.distill import parallel
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
from layersplice.planning.alignment import STUDENT_CONFIG_NAME

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "state.pt"
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
class RunRecord:
    """What the run's checkpoints record of where it came from, and the checkpoint it resumes."""

    sources: dict | None  # teacher and student identity; None when no checkpoint is written or read
    resume_from: Path | None = None


def begin(config: DistillConfig, world: World) -> RunRecord:
    """Before the models load: check --out, identify the teacher and student and, on
    --resume, verify the newest checkpoint (settings, sources, every byte)."""
    return parallel.decided_on_main(lambda: _begin(config), world)


def _begin(config: DistillConfig) -> RunRecord:
    check_out(config)
    if not (config.resume or config.save_every):
        return RunRecord(sources=None)
    sources = sources_identity(config)
    if not config.resume:
        return RunRecord(sources)
    found = saved_checkpoints(config.out)
    latest = found[-1]
    try:
        manifest = read_manifest(latest)
        check_same_run(manifest, config, sources)
        problem = damage(latest, manifest["files"], sorted(manifest["files"]))
        if problem:
            raise DamagedCheckpoint(problem)
    except DamagedCheckpoint as error:
        raise _damaged(latest, str(error), found[:-1]) from None
    return RunRecord(sources, latest)


def _damaged(latest: Path, problem: str, older: list[Path]) -> DamagedCheckpoint:
    intact = next((path for path in reversed(older) if is_intact(path)), None)
    if intact is None:
        advice = "no earlier checkpoint is intact; start again without --resume in a new --out"
    else:
        advice = (f"the one before it, {intact.name}, is intact: move {latest.name} out of {latest.parent} "
                  "and run again with --resume to continue from there")
    return DamagedCheckpoint(f"--resume: checkpoint {latest} is damaged: {problem}; {advice}")


def _rng_state(world: World) -> dict:
    cuda = torch.cuda.get_rng_state(world.device) if world.device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def save_checkpoint(
    config: DistillConfig, step: int, student, optimizer, scheduler, data_state: dict, world: World,
    record: RunRecord,
) -> None:
    """Collective: every rank calls it; rank 0 writes checkpoints/step-N and drops the oldest."""
    payload = {
        "step": step,
        "model": parallel.full_model_state(student),
        "optimizer": parallel.full_optimizer_state(student, optimizer),
        "scheduler": scheduler.state_dict(),
        "data": data_state,
        "rng": parallel.gather_objects(_rng_state(world), world),
    }
    if world.is_main:
        with atomic_directory(checkpoint_dir(config.out, step), inputs=()) as tmp:
            torch.save(payload, tmp / STATE_NAME)
            seal_manifest(tmp, step, config.run_identity(), record.sources, file_records(tmp, [STATE_NAME]))
        for older in saved_checkpoints(config.out)[:-KEEP]:
            shutil.rmtree(older)
    parallel.barrier(world)


def load_checkpoint(config: DistillConfig, student, optimizer, scheduler, world: World, record: RunRecord) -> dict:
    """Restore model, optimizer, scheduler and RNG from the verified checkpoint; return {"step", "data"}."""
    payload = {}
    if world.is_main:
        payload = torch.load(record.resume_from / STATE_NAME, map_location="cpu", weights_only=True)
    small = {key: payload.get(key) for key in ("step", "scheduler", "data", "rng")}
    small = parallel.broadcast_object(small, world)
    parallel.load_full_state(
        student, optimizer, payload.get("model", {}), payload.get("optimizer", {}), world
    )
    scheduler.load_state_dict(small["scheduler"])
    rng = small["rng"][world.rank] if world.rank < len(small["rng"]) else small["rng"][0]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and world.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], world.device)
    return {"step": small["step"], "data": small["data"]}


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another parameter (a tied head): gathered FSDP
    state holds them as separate copies, which transformers would write twice."""
    seen: set[int] = set()
    aliases = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            aliases.add(name)
        seen.add(id(parameter))
    return aliases


def export_student(config: DistillConfig, student, stored_dtype: torch.dtype, world: World) -> None:
    """Collective: gather the weights; rank 0 writes an HF directory loadable by transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state = parallel.full_model_state(student)
    if not world.is_main:
        return
    state = {name: tensor.to(stored_dtype) for name, tensor in state.items()}
    model_config = AutoConfig.from_pretrained(config.student)
    # A weightless shell writes config and weights the way transformers expects
    # (tied heads, shards, index); the live model may be FSDP-wrapped.
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(model_config, dtype=stored_dtype)
    aliases = _tied_aliases(shell)
    shell.save_pretrained(config.out, state_dict={k: v for k, v in state.items() if k not in aliases})
    for name in (STUDENT_CONFIG_NAME, *SIDE_FILES):
        for home in (config.student, config.teacher):
            if (home / name).is_file():
                shutil.copyfile(home / name, config.out / name)
                break
