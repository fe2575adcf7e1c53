"""This process's micro-batches, made one optimizer step ahead in a background thread.

While the models compute step s, a thread draws step s + 1's blocks (a slice
of a memory map for tokenized data; tokenizing and packing for raw text) and,
on CUDA, pins them in page-locked memory so that the copy to the device does
not wait on the CPU. The loop then waits only for what the thread has not
finished: `next()` says how long, and the run logs it as data_wait_s.

The stream is touched only by the thread once the feed starts, and its
position is read there, right after each batch: a checkpoint saved after step
s records the position after step s, not the one after the batch made ahead.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from layersplice.distill import parallel
from layersplice.distill.config import DataError
from layersplice.distill.data import Batch
from layersplice.distill.parallel import World

Made = tuple[torch.Tensor, dict]


class Feed:
    """The next global batch's share of this process, cut into micro-batches, one step ahead.

    `steps`: how many batches the run still takes; none is made beyond them."""

    def __init__(self, train, batch_size: int, micro_batch_size: int, world: World, steps: int) -> None:
        self.train, self.batch_size, self.micro_batch_size, self.world = train, batch_size, micro_batch_size, world
        self.position = train.state_dict()
        self._left = steps
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-data")
        self._ahead: Future[Made] | None = self._thread.submit(self._make) if steps > 0 else None

    def _make(self) -> Made:
        blocks = self.train.next_share(self.batch_size, self.world.rank, self.world.size)
        if self.world.device.type == "cuda":
            blocks = blocks.pin_memory()
        return blocks, self.train.state_dict()

    def next(self) -> tuple[list[Batch], float]:
        """The micro-batches of the next step, on the device, and the seconds spent waiting for them."""
        started = time.perf_counter()
        blocks, self.position = self._ahead.result()
        waited = time.perf_counter() - started
        self._left -= 1
        self._ahead = self._thread.submit(self._make) if self._left > 0 else None
        ids = blocks.to(self.world.device, non_blocking=True)
        batches = [Batch(part, torch.ones_like(part, dtype=torch.bool), padded=False)
                   for part in ids.split(self.micro_batch_size)]
        return batches, waited

    def state_dict(self) -> dict:
        """Collective: the position after the last step taken (every process's, for per-process streams)."""
        if self.train.per_rank:
            return {"processes": parallel.gather_objects(self.position, self.world)}
        return self.position

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)


def restore(train, state: dict, world: World) -> None:
    """Put a stream back at a checkpoint's position (this process's own, for a per-process stream)."""
    if not train.per_rank:
        train.load_state_dict(state)
        return
    positions = state["processes"]
    if len(positions) != world.size:
        raise DataError(
            f"--resume: the run streamed its --dataset split between {len(positions)} processes and "
            f"cannot continue with {world.size}; resume with {len(positions)}, or tokenize the data "
            "with `layersplice tokenize`, which any number of processes can resume"
        )
    train.load_state_dict(positions[world.rank])
