"""Model and optimizer state through torch.distributed.checkpoint (DCP).

Each process writes only its own shards of the student's weights and AdamW
state (get_state_dict of the FSDP2 model: DTensors named by parameter), so no
process ever holds the whole model or optimizer, and every process writes at
once. DCP records how each tensor was cut; a later run with any number of
processes reads the pieces it needs (DCP reshards on load), and so does one
process without FSDP.

On CUDA the save is asynchronous (dcp.async_save): the state is copied to
host memory, then written by a background thread while training goes on; the
background thread talks to the other ranks over a gloo group of its own, so
that its collectives never interleave with the training loop's. On CPU the
save is synchronous: there the copy would double the state in the same
memory that training uses (bench/RESULTS.md measures both).

DCP stores its .metadata as a pickle; it is read here by an unpickler that
accepts only the classes that metadata is made of, so a crafted checkpoint
cannot run code.
"""

from __future__ import annotations

import pickle
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from layersplice.distill.config import first_line
from layersplice.distill.parallel import World
from layersplice.errors import CheckpointError

# DCP warns on every save and load in one plain process; that is the one-process case, on purpose.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    *((_DCP_METADATA, name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
}


def asynchronous(world: World) -> bool:
    """Whether saves overlap training: on CUDA, where staging moves the state off the device."""
    return world.device.type == "cuda"


def checkpoint_group(world: World) -> dist.ProcessGroup | None:
    """Collective: the gloo group that asynchronous saves use, when there are several processes."""
    if world.distributed and asynchronous(world):
        return dist.new_group(backend="gloo")
    return None


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This process's shards of the model and optimizer state (whole tensors without FSDP)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save(state: dict, path: Path, world: World, group: dist.ProcessGroup | None) -> Future | None:
    """Collective: write `state` into the folder `path`; the write's future when asynchronous."""
    writer = dcp.FileSystemWriter(path)
    if asynchronous(world):
        return dcp.async_save(state, storage_writer=writer, process_group=group, no_dist=not world.distributed)
    dcp.save(state, storage_writer=writer, no_dist=not world.distributed)
    return None


# What a failed save raises: DCP gathers every rank's error into a CheckpointException,
# which is a BaseException, not an Exception.
SAVE_ERRORS = (Exception, dcp.CheckpointException)


def failure_reason(error: BaseException) -> str:
    """One line for a failed save: the first rank's own error when DCP gathered them."""
    if isinstance(error, dcp.CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    return f"{type(error).__name__}: {first_line(error)}"


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path, world: World) -> None:
    """Collective: fill the model and optimizer from the folder `path`, whatever process count wrote it."""
    try:
        _vet_metadata(path / ".metadata")
    except Exception as error:  # noqa: BLE001 - any failure to read it is the checkpoint's
        raise CheckpointError(f"checkpoint {path.parent}: {first_line(error)}") from None
    state = state_of(model, optimizer)
    dcp.load(state, storage_reader=_VettedReader(path), no_dist=not world.distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _ALLOWED or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"its DCP metadata would load {module}.{name}, which checkpoint metadata never holds; "
            "it was not written by layersplice and is not read"
        )


def _vet_metadata(path: Path) -> None:
    """Unpickle DCP's metadata file with only the classes it is made of allowed."""
    with open(path, "rb") as handle:
        _MetadataUnpickler(handle).load()


class _VettedReader(dcp.FileSystemReader):
    """DCP's file reader, but the metadata file it unpickles is vetted first."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        _vet_metadata(Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata"))
        return super().read_metadata(*args, **kwargs)
