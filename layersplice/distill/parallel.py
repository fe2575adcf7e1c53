"""Processes and devices: one plain process, or torchrun with FSDP2 (NCCL on GPU,
gloo on CPU). With one process there is nothing to shard, and no FSDP at all,
whether torchrun started it or not. With several, the student is sharded and
the frozen teacher is replicated (it has no gradients or optimizer state to
share out) unless --shard-teacher asks for it to be sharded too.

Everything here is a thin call into torch.distributed; in a plain process every
helper degrades to the single-device operation, so the loop has one path.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from layersplice.distill.config import DistillError
from layersplice.errors import ArchitectureError, LayerspliceError

T = TypeVar("T")

# FSDP2 warns that the root returns views (HF's ModelOutput); we never modify them in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.distributed and self.size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA; fp32 on CPU, where bf16 matmuls are slow and inexact."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def start_world(device: str) -> World:
    """Join the torchrun process group when WORLD_SIZE > 1."""
    distributed = "WORLD_SIZE" in os.environ
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DistillError("--device cuda asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if distributed and not dist.is_initialized():
        if chosen.type == "cuda":
            dist.init_process_group("nccl", device_id=chosen)
        else:
            dist.init_process_group("gloo")
    return World(rank, size, chosen, distributed)


def stop_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: the classes HF lists in _no_split_modules."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ArchitectureError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules); "
            "it cannot be sharded: run distill without torchrun"
        )
    return layers


def prepare_layers(model: torch.nn.Module, compile_layers: bool, checkpointing: bool) -> None:
    """Per decoder layer: activation checkpointing (recompute in backward), torch.compile."""
    if checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable; both default to non-reentrant
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if compile_layers:
        for layer in decoder_layers(model):
            layer.compile()  # in place: parameter names, and so checkpoints, stay as they are


def place(model: torch.nn.Module, world: World, shard: bool, mixed_precision: bool = False) -> torch.nn.Module:
    """The model on this process's device; sharded by FSDP2 when asked and there are several processes.

    The root unit holds the embeddings, final norm and LM head, and stays gathered
    from forward to backward: the chunked loss reads the head after the forward,
    once a chunk, and must not gather it again each time. On CUDA a trained model
    computes in bf16 and reduces its gradients in fp32.
    """
    if not (shard and world.sharded):
        return model.to(world.device)
    policy = MixedPrecisionPolicy()
    if mixed_precision and world.device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def mean_over_ranks(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)  # gloo has no AVG
        values /= world.size
    return values


def sum_over_ranks(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (across shards); return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def broadcast_object(value: object, world: World) -> object:
    """Rank 0's `value` on every rank."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decided_on_main(decide: Callable[[], T], world: World) -> T:
    """Run `decide` on rank 0 only (it may touch files only rank 0 sees); every rank
    gets its result, or raises the user error it raised, so no rank is left waiting."""
    if not world.distributed:
        return decide()
    outcome: tuple[object, LayerspliceError | None] = (None, None)
    if world.is_main:
        try:
            outcome = (decide(), None)
        except LayerspliceError as error:
            outcome = (None, error)
    result, error = broadcast_object(outcome, world)
    if error is not None:
        raise error
    return result


def gather_objects(value: object, world: World) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not world.distributed:
        return [value]
    values: list = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def on_all_ranks(flag: bool, world: World) -> bool:
    """Whether `flag` holds on every rank."""
    if not world.distributed:
        return flag
    value = torch.tensor([int(flag)], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
