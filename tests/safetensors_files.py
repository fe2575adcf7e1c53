"""Raw reads of safetensors checkpoints (single file or sharded with an index), no torch.

Tests compare tensors by their stored bytes, so these helpers parse the format
directly: an 8-byte little-endian header length, a JSON header, then the data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorLocation:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def shard_paths(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({directory / name for name in weight_map.values()})
    return sorted(directory.glob("*.safetensors"))


def tensor_locations(directory: Path) -> dict[str, TensorLocation]:
    """Where every tensor's bytes lie, from the headers only."""
    locations: dict[str, TensorLocation] = {}
    for path in shard_paths(directory):
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        data_start = 8 + header_len
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            assert name not in locations, f"{name} is stored twice in {directory}"
            begin, end = entry["data_offsets"]
            locations[name] = TensorLocation(
                path, entry["dtype"], tuple(entry["shape"]), data_start + begin, data_start + end
            )
    return locations


def read_bytes(location: TensorLocation) -> bytes:
    with location.path.open("rb") as f:
        f.seek(location.start)
        return f.read(location.end - location.start)


def tensors_as_bytes(directory: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, raw bytes) for a small checkpoint."""
    return {
        name: (loc.dtype, loc.shape, read_bytes(loc))
        for name, loc in tensor_locations(directory).items()
    }
