"""Write safetensors shards by copying source byte ranges: the header first, then
kernel-side copies of coalesced ranges, or a chunked cast where a dtype changes
(or chunked arithmetic on several sources, for items that compute their bytes).

Tensor bytes never become Python or torch objects: copies run in the kernel
(checkpoint/kernel.py: splice, else copy_file_range, sendfile, buffered
reads), casts stream one chunk at a time, and a thread hashes the output as it
is written (checkpoint/digest.py) and then asks the kernel to start writing
that range to disk. Memory stays bounded by a few buffers whatever the model
size. Each shard's disk space is reserved before its first byte, and its
header is padded (with the spaces safetensors allows) so that most copied
bytes keep their source's offset within a page, which kernel copies need to
run at full speed. Files are not fsynced here: the atomic output directory
syncs everything once before its rename.
"""

from __future__ import annotations

import errno
import functools
import os
import queue
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

from layersplice.checkpoint import kernel
from layersplice.checkpoint.digest import TrailingDigest
from layersplice.checkpoint.kernel import preallocate, pwrite_all, start_writeback
from layersplice.checkpoint.safetensors_format import DTYPE_SIZES, PAGE_BYTES, TensorInfo, encode_header
from layersplice.errors import NonFiniteError

FORMAT_METADATA = {"format": "pt"}
# Bytes per copier call, and so how closely the checksum thread follows.
COPY_CHUNK = 16 << 20
CAST_WORKERS = 2  # threads that read and convert cast chunks (conversion and I/O release the GIL)
ProgressFn = Callable[[int], None]
# (first element, element count, output buffer) -> the output bytes of that chunk.
ChunkFn = Callable[[int, int, bytearray], memoryview]


class WriteItem(Protocol):
    name: str
    source: TensorInfo
    dtype: str
    model: str  # the model `source` belongs to (the teacher, the student), as errors name it

    @property
    def nbytes(self) -> int: ...

    @property
    def is_copy(self) -> bool: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def parts(self) -> Sequence[WriteItem]:
        """Items of one source range each, written one after another (a fused tensor has several)."""


@runtime_checkable
class Computed(Protocol):
    """An item whose bytes are computed from several sources (checkpoint/delta.py) rather
    than cast from one: it hands the writer its own chunk function."""

    def chunks(self, fd: Callable[[Path], int]) -> ChunkFn: ...


@dataclass(frozen=True)
class WrittenFile:
    name: str
    size: int
    blake3: str
    tensors: tuple[str, ...]  # in data order


class SourceFiles:
    """Source files opened once for a whole build (every shard and every size)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def source_order(items: Sequence[WriteItem]) -> list[WriteItem]:
    """Plan order, except that consecutive items read from one file follow that file's
    byte order, so that a layer stored contiguously is copied as one range.

    Depends only on the plan (not on where the sources live), so output bytes
    stay the same for the same inputs.
    """
    ordered: list[WriteItem] = []
    run: list[WriteItem] = []
    for item in items:
        if run and item.source.file != run[0].source.file:
            ordered += sorted(run, key=lambda i: i.source.start)
            run = []
        run.append(item)
    return ordered + sorted(run, key=lambda i: i.source.start)


def write_shards(
    directory: Path, items: Sequence[WriteItem], shard_size: int, sources: SourceFiles,
    progress: ProgressFn | None = None,
) -> list[WrittenFile]:
    written = []
    shards = shard_items(items, shard_size)
    for name, shard in zip(shard_names(len(shards)), shards):
        ordered = source_order(shard)
        size, digest = _write_file(directory / name, ordered, sources, progress or _ignore)
        written.append(WrittenFile(name, size, digest, tuple(i.name for i in ordered)))
    return written


def _ignore(_: int) -> None:
    pass


def _write_file(path: Path, items: Sequence[WriteItem], sources: SourceFiles, progress: ProgressFn) -> tuple[int, str]:
    """Write one shard; returns its size and BLAKE3 digest."""
    runs = _coalesce([part for item in items for part in item.parts])
    header = encode_header(
        [(i.name, i.dtype, i.shape, i.nbytes) for i in items], FORMAT_METADATA, data_phase=_data_phase(runs)
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    digest = None
    try:
        preallocate(fd, len(header) + sum(i.nbytes for i in items))
        digest = TrailingDigest(path, then=start_writeback)
        pwrite_all(fd, header, 0)
        offset = len(header)
        digest.written(offset)
        for run in runs:
            first = run[0]
            if first.is_copy:
                src = sources.fd(first.source.file)
                length = run[-1].source.end - first.source.start
                offset = _copy_range(src, fd, first.source.start, offset, length, digest, progress)
            else:
                offset = _convert_range(fd, first, _chunk_function(first, sources), offset, digest, progress)
        return offset, digest.finish()
    finally:
        if digest is not None:
            digest.close()
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


def _data_phase(runs: Sequence[Sequence[WriteItem]]) -> int | None:
    """The offset within a page at which tensor data should start so that the most
    copied bytes sit at the same offset within a page as in their source file.

    Only phases that keep data 8-byte aligned qualify; ties go to the smallest,
    so the output depends on the inputs alone. None when nothing is copied.
    """
    votes: dict[int, int] = {}
    offset = 0
    for run in runs:
        length = sum(part.nbytes for part in run)
        phase = (run[0].source.start - offset) % PAGE_BYTES
        if run[0].is_copy and phase % 8 == 0:
            votes[phase] = votes.get(phase, 0) + length
        offset += length
    return max(sorted(votes), key=votes.__getitem__, default=None)


def _copy_range(
    src: int, dst: int, src_off: int, dst_off: int, length: int, digest: TrailingDigest, progress: ProgressFn
) -> int:
    """Copy in the kernel where the files allow it; returns the output offset after the range."""
    copiers = list(kernel.COPIERS)
    done = 0
    while done < length:
        count = min(COPY_CHUNK, length - done)
        try:
            n = copiers[0](src, dst, count, src_off + done, dst_off + done)
        except OSError as exc:
            if exc.errno not in kernel.UNSUPPORTED or len(copiers) == 1:
                raise
            copiers.pop(0)
            continue
        if n == 0:
            raise OSError(errno.EIO, f"source ended {length - done} bytes early")
        done += n
        digest.written(dst_off + done)
        progress(n)
    return dst_off + length


def _chunk_function(item: WriteItem, sources: SourceFiles) -> ChunkFn:
    if isinstance(item, Computed):
        return item.chunks(sources.fd)
    return functools.partial(_cast_chunk, sources.fd(item.source.file), item.source, item.dtype, item.model)


def _convert_range(
    dst: int, item: WriteItem, convert: ChunkFn, dst_off: int, digest: TrailingDigest, progress: ProgressFn
) -> int:
    """Write one item converted chunk by chunk (a cast, or a computed item); returns the
    output offset after it.

    CAST_WORKERS threads read and convert chunks into buffers from a small
    pool; this thread writes them in order (two threads writing one file
    would only spin on its lock) and hands them to the checksum thread, which
    hashes them from memory and puts them back in the pool.
    """
    from layersplice.checkpoint.cast import IO_ELEMENTS

    info = item.source
    in_size, out_size = DTYPE_SIZES[info.dtype], DTYPE_SIZES[item.dtype]
    pool = _cast_buffers(item.dtype, IO_ELEMENTS)
    pending: deque[tuple[Future, bytearray, int]] = deque()
    end = dst_off

    def write_oldest() -> None:
        nonlocal end
        future, buffer, count = pending.popleft()
        try:
            data = future.result()
            pwrite_all(dst, data, end)
        except BaseException:
            pool.put(buffer)
            raise
        end += count * out_size
        digest.written(end, data, functools.partial(pool.put, buffer))
        progress(count * in_size)

    def free_buffer() -> bytearray:
        while pending:
            try:
                return pool.get_nowait()
            except queue.Empty:
                write_oldest()
        return pool.get()  # the checksum thread hands buffers back as it hashes them

    try:
        for first in range(0, info.numel, IO_ELEMENTS):
            count = min(IO_ELEMENTS, info.numel - first)
            buffer = free_buffer()
            future = _cast_pool().submit(convert, first, count, buffer)
            pending.append((future, buffer, count))
        while pending:
            write_oldest()
    finally:
        # No worker may outlive this call: the source descriptor may be closed next.
        for future, _, _ in pending:
            future.cancel()
        wait([future for future, _, _ in pending])
        for _, buffer, _ in pending:
            pool.put(buffer)
    return end


@functools.cache
def _cast_buffers(dtype: str, elements: int) -> queue.SimpleQueue[bytearray]:
    """Buffers for `elements` of `dtype`, allocated once per process (fresh pages cost a
    fault each): each one is lent to a cast chunk until the checksum thread has hashed it."""
    pool: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(2 * CAST_WORKERS + 1):
        pool.put(bytearray(elements * DTYPE_SIZES[dtype]))
    return pool


def _cast_chunk(src: int, info: TensorInfo, dtype: str, model: str, first: int, count: int, output) -> memoryview:
    from layersplice.checkpoint.cast import NonFinite, cast_for, cast_refusal

    cast = cast_for(info.dtype, dtype)
    source = cast.input[: count * cast.in_size]
    if os.preadv(src, [source], info.start + first * cast.in_size) != len(source):
        raise OSError(errno.EIO, f"{info.file}: tensor {info.name} is truncated")
    try:
        return cast.convert(source, output)
    except NonFinite as problem:
        raise NonFiniteError(cast_refusal(problem, info, model, first, dtype)) from None


@functools.cache
def _cast_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(CAST_WORKERS, thread_name_prefix="layersplice-cast")
