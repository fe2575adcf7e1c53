"""Write safetensors shards by copying source byte ranges: headers first, then
kernel-side copies of coalesced ranges, or a chunked cast where a dtype changes.
Memory stays bounded by one cast chunk whatever the model size."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from layersplice.checkpoint.safetensors_format import DTYPE_SIZES, TensorInfo, encode_header

FORMAT_METADATA = {"format": "pt"}
COPY_CHUNK = 1 << 30
CAST_CHUNK_BYTES = 16 << 20
HASH_CHUNK = 8 << 20
ProgressFn = Callable[[int], None]


class WriteItem(Protocol):
    name: str
    source: TensorInfo
    dtype: str

    @property
    def nbytes(self) -> int: ...

    @property
    def is_copy(self) -> bool: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def parts(self) -> Sequence[WriteItem]:
        """Items of one source range each, written one after another (a fused tensor has several)."""


@dataclass(frozen=True)
class WrittenFile:
    name: str
    size: int
    sha256: str
    tensors: tuple[str, ...]


def shard_items(items: Sequence[WriteItem], shard_size: int) -> list[list[WriteItem]]:
    """Greedy shards in plan order; a tensor larger than shard_size gets a shard of its own."""
    shards: list[list[WriteItem]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_shards(
    directory: Path, items: Sequence[WriteItem], shard_size: int, progress: ProgressFn | None = None
) -> list[WrittenFile]:
    shards = shard_items(items, shard_size)
    written = []
    for name, shard in zip(shard_names(len(shards)), shards):
        path = directory / name
        _write_file(path, shard, progress or (lambda n: None))
        written.append(WrittenFile(name, path.stat().st_size, sha256_file(path), tuple(i.name for i in shard)))
    return written


def _write_file(path: Path, items: Sequence[WriteItem], progress: ProgressFn) -> None:
    header = encode_header([(i.name, i.dtype, i.shape, i.nbytes) for i in items], FORMAT_METADATA)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, header)
        offset = len(header)
        sources: dict[Path, int] = {}
        try:
            for run in _coalesce([part for item in items for part in item.parts]):
                first = run[0]
                src_fd = sources.get(first.source.file)
                if src_fd is None:
                    src_fd = sources[first.source.file] = os.open(first.source.file, os.O_RDONLY)
                if first.is_copy:
                    length = run[-1].source.end - first.source.start
                    _copy_range(src_fd, fd, first.source.start, offset, length, progress)
                else:
                    length = _cast_range(src_fd, fd, first, offset, progress)
                offset += length
        finally:
            for src in sources.values():
                os.close(src)
        os.fsync(fd)
    finally:
        os.close(fd)


def _coalesce(items: Sequence[WriteItem]) -> list[list[WriteItem]]:
    """Group consecutive plain copies whose source ranges are adjacent in one file."""
    runs: list[list[WriteItem]] = []
    for item in items:
        prev = runs[-1][-1] if runs else None
        if (
            prev is not None
            and prev.is_copy
            and item.is_copy
            and prev.source.file == item.source.file
            and prev.source.end == item.source.start
        ):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _copy_range(src: int, dst: int, src_off: int, dst_off: int, length: int, progress: ProgressFn) -> None:
    """Kernel-side copy; falls back to sendfile, then to buffered reads."""
    done = 0
    copier = _copy_file_range
    while done < length:
        count = min(COPY_CHUNK, length - done)
        try:
            n = copier(src, dst, count, src_off + done, dst_off + done)
        except OSError:
            if copier is _pread_pwrite:
                raise
            copier = _pread_pwrite
            continue
        if n == 0:
            raise OSError(f"source ended {length - done} bytes early")
        done += n
        progress(n)


def _copy_file_range(src: int, dst: int, count: int, src_off: int, dst_off: int) -> int:
    return os.copy_file_range(src, dst, count, src_off, dst_off)


def _pread_pwrite(src: int, dst: int, count: int, src_off: int, dst_off: int) -> int:
    data = os.pread(src, min(count, 64 << 20), src_off)
    if data:
        os.pwrite(dst, data, dst_off)
    return len(data)


def _cast_range(src: int, dst: int, item: WriteItem, dst_off: int, progress: ProgressFn) -> int:
    """Cast one tensor chunk by chunk; returns the bytes written."""
    import torch

    from layersplice.checkpoint.torch_dtypes import TORCH_DTYPES

    in_size, out_size = DTYPE_SIZES[item.source.dtype], DTYPE_SIZES[item.dtype]
    step = max(1, CAST_CHUNK_BYTES // in_size)
    numel = item.source.numel
    written = 0
    for first in range(0, numel, step):
        count = min(step, numel - first)
        raw = os.pread(src, count * in_size, item.source.start + first * in_size)
        if len(raw) != count * in_size:
            raise OSError(f"{item.source.file}: tensor {item.source.name} is truncated")
        values = torch.frombuffer(bytearray(raw), dtype=TORCH_DTYPES[item.source.dtype])
        out = values.to(TORCH_DTYPES[item.dtype]).view(torch.uint8).numpy()
        os.pwrite(dst, out, dst_off + written)
        written += count * out_size
        progress(count * in_size)
    return written


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
