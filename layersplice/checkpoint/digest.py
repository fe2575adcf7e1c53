"""Checksums of written files: BLAKE3, computed while the file is being written.

sha256 through hashlib runs at ~0.45 GB/s on the 2-core machines layersplice
targets, slower than the kernel copies a checkpoint; BLAKE3 runs at ~5 GB/s
on one core there (bench/RESULTS.md). A thread follows the writer and hashes
each range of the OUTPUT file as soon as it is complete, reading it through a
small memory map of the page cache (no copy), so the checksum covers the bytes
really written and costs no time after the last one.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Callable

from blake3 import blake3

CHECKSUM = "blake3"
WINDOW = 8 << 20  # bytes mapped at a time: this much page cache counts in our RSS
RangeFn = Callable[[int, int, int], None]  # (fd, offset, length)


def blake3_file(path: Path) -> str:
    """The BLAKE3 hex digest of a whole file, read in chunks (any file, even one
    that changes meanwhile: no memory map that could fault)."""
    digest = blake3()
    buffer = bytearray(WINDOW)
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buffer]):
            digest.update(view[:n])
    finally:
        os.close(fd)
    return digest.hexdigest()


def _hash_range(digest: blake3, fd: int, start: int, end: int, then: RangeFn | None) -> None:
    """Hash [start, end) of a file this process is writing (so it cannot shrink)."""
    while start < end:
        offset = start - start % mmap.ALLOCATIONGRANULARITY
        length = min(end, offset + WINDOW) - offset
        with mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=offset) as window:
            with memoryview(window)[start - offset :] as view:
                digest.update(view)
        if then is not None:
            then(fd, start, offset + length - start)
        start = offset + length


class TrailingDigest:
    """BLAKE3 of a file written front to back, hashed by a thread that trails the writer.

    The writer calls `written(end)` whenever every byte before `end` is in the
    file, then `finish()` for the digest; `close()` stops the thread early.
    `then(fd, offset, length)` runs on the thread after each range is hashed.
    """

    def __init__(self, path: Path, then: RangeFn | None = None) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._then = then
        self._ends: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._digest = blake3()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"blake3 {path.name}", daemon=True)
        self._thread.start()

    def written(self, end: int) -> None:
        self._ends.put(end)

    def finish(self) -> str:
        self.close()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._ends.put(None)
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _run(self) -> None:
        done = 0
        try:
            while (end := self._ends.get()) is not None:
                _hash_range(self._digest, self._fd, done, end, self._then)
                done = max(done, end)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the writer's thread by finish()
            self._error = exc
            while self._ends.get() is not None:
                pass
