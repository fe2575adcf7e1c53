"""Checksums of written files: BLAKE3, computed while the file is being written.

sha256 through hashlib runs at ~0.45 GB/s on the 2-core machines layersplice
targets, slower than the kernel copies a checkpoint; BLAKE3 runs at ~5 GB/s
on one core there (bench/RESULTS.md). A thread follows the writer and hashes
each range of the OUTPUT file as soon as it is complete, so the checksum costs
almost no time after the last byte. Ranges the kernel copied are read back
from the page cache 1 MiB at a time (a buffer that stays in the CPU cache
while it is hashed; memory maps cost more in page faults); ranges the writer
wrote from its own memory (casts) are hashed from that memory, which the
thread hands back when done.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from pathlib import Path
from typing import Callable

from blake3 import blake3

CHECKSUM = "blake3"
READ_BYTES = 1 << 20
RangeFn = Callable[[int, int, int], None]  # (fd, offset, length)


def blake3_file(path: Path) -> str:
    """The BLAKE3 hex digest of a whole file (any file, even one that changes meanwhile)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return blake3_fd(fd)
    finally:
        os.close(fd)


def blake3_fd(fd: int) -> str:
    """The BLAKE3 hex digest of the whole file open at `fd` (read with pread: its offset is left alone)."""
    digest = blake3()
    _hash_range(digest, fd, 0, None, bytearray(min(READ_BYTES, max(os.fstat(fd).st_size, 1))))
    return digest.hexdigest()


def _hash_range(digest: blake3, fd: int, start: int, end: int | None, buffer: bytearray) -> None:
    """Hash [start, end) of a file, or to its end when `end` is None."""
    view = memoryview(buffer)
    while end is None or start < end:
        wanted = len(buffer) if end is None else min(len(buffer), end - start)
        n = os.preadv(fd, [view[:wanted]], start)
        if n == 0:
            if end is None:
                return
            raise OSError(errno.EIO, f"file ended at {start} bytes while {end} were written")
        digest.update(view[:n])
        start += n


class TrailingDigest:
    """BLAKE3 of a file written front to back, hashed by a thread that trails the writer.

    The writer calls `written(end)` whenever every byte before `end` is in the
    file, or `written(end, data, release)` when the bytes that end at `end` were
    written from `data` (the thread hashes `data`, then calls `release()`, even
    after an error), then `finish()` for the digest; `close()` stops the thread
    early. `then(fd, offset, length)` runs on the thread after each range is hashed.
    """

    def __init__(self, path: Path, then: RangeFn | None = None) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._then = then
        self._ends: queue.SimpleQueue[tuple[int, memoryview | None, Callable[[], None] | None] | None] = (
            queue.SimpleQueue()
        )
        self._digest = blake3()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"blake3 {path.name}", daemon=True)
        self._thread.start()

    def written(self, end: int, data: memoryview | None = None, release: Callable[[], None] | None = None) -> None:
        self._ends.put((end, data, release))

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
        buffer = bytearray(READ_BYTES)
        try:
            while (step := self._ends.get()) is not None:
                end, data, release = step
                try:
                    if data is not None:
                        if len(data) != end - done:
                            raise ValueError(f"{len(data)} bytes handed over for the range {done}..{end}")
                        self._digest.update(data)
                    elif end > done:
                        _hash_range(self._digest, self._fd, done, end, buffer)
                finally:
                    if release is not None:
                        release()
                if end > done and self._then is not None:
                    self._then(self._fd, done, end - done)
                done = max(done, end)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the writer's thread by finish()
            self._error = exc
            while (step := self._ends.get()) is not None:
                if step[2] is not None:
                    step[2]()
