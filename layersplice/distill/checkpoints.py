"""What a run leaves in --out: resume checkpoints and the final student directory.

A resume checkpoint is one torch.save file of tensors and plain Python values
(read back with weights_only=True): full model and optimizer state, scheduler,
data position and every rank's RNG. Only rank 0 writes; on resume rank 0 reads
and the other ranks receive what they need by broadcast, so --out need not be
on a filesystem that every node sees.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from layersplice.checkpoint.atomic import refuse_overlap
from layersplice.checkpoint.source import SIDE_FILES
from layersplice.distill import parallel
from layersplice.distill.config import DistillConfig, DistillError
from layersplice.distill.parallel import World
from layersplice.errors import OutputError
from layersplice.planning.alignment import STUDENT_CONFIG_NAME

CHECKPOINT_DIR = "checkpoints"


def checkpoint_path(out: Path, step: int) -> Path:
    return out / CHECKPOINT_DIR / f"step-{step:07d}.pt"


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINT_DIR).glob("step-*.pt"))
    return found[-1] if found else None


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
        if latest_checkpoint(out) is None:
            raise OutputError(
                f"--resume: {out / CHECKPOINT_DIR} holds no checkpoint; run without --resume "
                "(add --save-every N to write checkpoints)"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise OutputError(
            f"--out {out} is not empty; pass --resume to continue the run in it, or choose a new directory"
        )


def _rng_state(world: World) -> dict:
    cuda = torch.cuda.get_rng_state(world.device) if world.device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def save_checkpoint(
    config: DistillConfig, step: int, student, optimizer, scheduler, data_state: dict, world: World
) -> None:
    """Collective: every rank calls it; rank 0 writes step-N.pt and drops older ones."""
    payload = {
        "step": step,
        "identity": config.run_identity(),
        "model": parallel.full_model_state(student),
        "optimizer": parallel.full_optimizer_state(student, optimizer),
        "scheduler": scheduler.state_dict(),
        "data": data_state,
        "rng": parallel.gather_objects(_rng_state(world), world),
    }
    if world.is_main:
        path = checkpoint_path(config.out, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save(payload, partial)
        os.replace(partial, path)
        for older in (config.out / CHECKPOINT_DIR).glob("step-*.pt"):
            if older != path:
                older.unlink()
    parallel.barrier(world)


def load_checkpoint(config: DistillConfig, student, optimizer, scheduler, world: World) -> dict:
    """Restore model, optimizer, scheduler and RNG; return {"step", "data"} for the loop."""
    payload = {}
    if world.is_main:
        payload = torch.load(latest_checkpoint(config.out), map_location="cpu", weights_only=True)
    small = {key: payload.get(key) for key in ("step", "identity", "scheduler", "data", "rng")}
    small = parallel.broadcast_object(small, world)
    if small["identity"] != config.run_identity():
        changed = sorted(k for k, v in config.run_identity().items() if small["identity"].get(k) != v)
        raise DistillError(
            f"--resume: {config.out} holds a run with other settings ({', '.join(changed)}); "
            "resume with the same settings or choose a new --out"
        )
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
