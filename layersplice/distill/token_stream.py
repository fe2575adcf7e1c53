"""Training blocks of a `layersplice tokenize` output, read from its memory map.

Epoch e serves every block once, in the order `shuffled(blocks, seed, e)`: a
seeded permutation of all the blocks, not of windows. Global position p (blocks
served since the run started) is block `shuffled(blocks, seed, p // blocks)[p %
blocks]`, and the position after step s is s x --batch-size, so a checkpoint
needs nothing else to resume exactly. Process r of n reads positions
[r*share, (r+1)*share) of each global batch and no others: nothing is
tokenized in the loop, no process reads another's blocks, and the global batch
is the same whatever the number of processes.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from layersplice.checkpoint.token_shards import TokenShards
from layersplice.distill.config import DataError


def shuffled(count: int, seed: int, index: int) -> np.ndarray:
    """A permutation of range(count), fixed by (seed, index): window or epoch `index` of a run.

    Python's shuffle seeded by the string "seed:index", as raw-text windows
    have always been shuffled (the fixture pair was trained in that order);
    about 0.4 s for a million blocks, once an epoch."""
    order = list(range(count))
    random.Random(f"{seed}:{index}").shuffle(order)
    return np.array(order, dtype=np.int64)


class TokenStream:
    """Blocks of a tokenize output in a seeded permutation per epoch; position = blocks served."""

    per_rank = False

    def __init__(self, shards: TokenShards, seed: int) -> None:
        self.blocks, self.seed = shards.train(), seed
        self.identity = shards.record["checksum"]
        self.served = 0
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:  # a batch spans at most two epochs
            self._orders = {e: order for e, order in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = shuffled(len(self.blocks), self.seed, epoch)
        return self._orders[epoch]

    def indices(self, first: int, count: int) -> np.ndarray:
        """The blocks at global positions first, first + 1, ..., first + count - 1."""
        positions = np.arange(first, first + count)
        epochs, within = np.divmod(positions, len(self.blocks))
        return np.array([self._order(int(e))[i] for e, i in zip(epochs, within)], dtype=np.int64)

    def next_share(self, batch_size: int, rank: int, processes: int) -> torch.Tensor:
        """This process's blocks of the next global batch, read from the memory map."""
        share = batch_size // processes
        rows = self.blocks[self.indices(self.served + rank * share, share)]
        self.served += batch_size
        return torch.from_numpy(rows.astype(np.int64))

    def next_blocks(self, count: int) -> torch.Tensor:
        return self.next_share(count, 0, 1)

    def state_dict(self) -> dict:
        return {"served": self.served, "tokens": self.identity}

    def load_state_dict(self, state: dict) -> None:
        if state.get("tokens") != self.identity:
            raise DataError(
                "--resume: the checkpoint was trained on other data than this --data (it was tokenized "
                "again, or is another tokenize output); resume with the data the run started with"
            )
        self.served = state["served"]
