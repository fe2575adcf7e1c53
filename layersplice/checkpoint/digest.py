"""Checksums of written files: BLAKE3, computed while the file is being written.

sha256 through hashlib runs at ~0.45 GB/s on the 2-core machines layersplice
targets, three times slower than the kernel copies a checkpoint; BLAKE3 runs
at ~2 GB/s on one core (bench/RESULTS.md). A thread follows the writer and
hashes each range of the OUTPUT file as soon as it is complete (reading it
back from the page cache), so the checksum covers the bytes really written and
costs no time after the last one.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

from blake3 import blake3

CHECKSUM = "blake3"
HASH_CHUNK = 8 << 20


def blake3_file(path: Path) -> str:
    """The BLAKE3 hex digest of a whole file, read in chunks."""
    digest = blake3()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buffer]):
            digest.update(view[:n])
    finally:
        os.close(fd)
    return digest.hexdigest()


class TrailingDigest:
    """BLAKE3 of a file written front to back, hashed by a thread that trails the writer.

    The writer calls `written(end)` whenever every byte before `end` is in the
    file, then `finish()` for the digest; `close()` stops the thread early.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)
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
        buffer = bytearray(HASH_CHUNK)
        view = memoryview(buffer)
        done = 0
        try:
            while (end := self._ends.get()) is not None:
                while done < end:
                    n = os.preadv(self._fd, [view[: min(HASH_CHUNK, end - done)]], done)
                    if n == 0:
                        raise OSError(f"file ended at {done} bytes while hashing up to {end}")
                    self._digest.update(view[:n])
                    done += n
        except BaseException as exc:  # noqa: BLE001 - re-raised in the writer's thread by finish()
            self._error = exc
            while self._ends.get() is not None:
                pass
