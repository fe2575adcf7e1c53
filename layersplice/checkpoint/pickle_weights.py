"""PyTorch pickle checkpoints (pytorch_model*.bin), read only on explicit opt-in.

They are loaded with torch.load(weights_only=True), one file at a time, and
rewritten as safetensors in a private temporary directory that is removed when
the process exits; from there on they go through the same byte-range machinery.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

from layersplice.checkpoint.bounded import INDEX_LIMIT, read_bounded
from layersplice.errors import CheckpointError

PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def pickle_files(directory: Path) -> list[Path]:
    """The pickle shards a directory holds, by its index if it has one."""
    index = directory / PICKLE_INDEX
    if index.is_file():
        try:
            text = read_bounded(index, INDEX_LIMIT, "index", CheckpointError)
            names = sorted(set(json.loads(text)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map'") from None
        for name in names:
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard name {name!r} is not a plain file name")
        return [directory / name for name in names]
    single = directory / PICKLE_SINGLE
    return [single] if single.is_file() else sorted(directory.glob("*.bin"))


def convert_to_safetensors(files: list[Path]) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    workdir = Path(tempfile.mkdtemp(prefix="layersplice-pickle-"))
    atexit.register(shutil.rmtree, workdir, True)
    converted = []
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad input
            raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {exc}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: not a plain state dict of tensors")
        # Tied weights share storage; safetensors wants each tensor on its own.
        tensors = {name: t.detach().clone().contiguous() for name, t in state.items()}
        target = workdir / (path.stem + ".safetensors")
        save_file(tensors, str(target), metadata={"format": "pt"})
        converted.append(target)
        del state, tensors
    return converted
