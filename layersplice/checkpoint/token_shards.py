"""The bytes of a `layersplice tokenize` output: token ids as flat little-endian
numpy arrays (the `.bin` files of nanoGPT and Megatron), described by a sealed
layersplice.json.

    TOKENS/
      layersplice.json   sealed record: kind "tokens", dtype, seq_len, EOS id, the
                         tokenizer's digest, the sources, the counts, and the
                         size and BLAKE3 checksum of each file
      train.bin          blocks x seq_len token ids: the training blocks, in corpus order
      val.bin            the held-out tokens, in order (not cut into blocks)

Why raw arrays rather than a `datasets` Arrow table (save_to_disk): every
training block has the same length, so block i is bytes [i*L*w, (i+1)*L*w)
of train.bin. The index is one number (L, the --seq-len, recorded with the
block count), and reading any block is a slice of a memory map: no offsets
column, no decoding, no pyarrow in the training loop, and any process can read
any block without reading the ones before it. Arrow would store a list column
with an offsets array per row and read through a library; the arrays here are
also what other trainers (nanoGPT, Megatron's indexed datasets) read, and the
same inputs give byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from layersplice.checkpoint.sealed_json import read_sealed
from layersplice.errors import CheckpointError

if TYPE_CHECKING:  # numpy is imported where arrays are made: `build` imports verify, and no numpy
    import numpy as np

KIND = "tokens"
RECORD_FILE = "layersplice.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
SCAN_TOKENS = 1 << 24  # token ids checked at a time by `largest_token`


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned type that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def is_token_dir(path: Path) -> bool:
    """Whether `path` holds a tokenize output (by its record's kind; not yet checked)."""
    try:
        record = json.loads((path / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and record.get("kind") == KIND


@dataclass(frozen=True)
class TokenShards:
    """A checked tokenize output: its record, and its files as memory maps."""

    directory: Path
    record: dict

    @property
    def seq_len(self) -> int:
        return self.record["seq_len"]

    @property
    def blocks(self) -> int:
        return self.record["train"]["blocks"]

    @property
    def val_tokens(self) -> int:
        return self.record["validation"]["tokens"]

    @property
    def dtype(self) -> np.dtype:
        import numpy as np

        return np.dtype(self.record["dtype"]).newbyteorder("<")

    def train(self) -> np.ndarray:
        """The training blocks, [blocks, seq_len], mapped (read only when indexed)."""
        return self._map(TRAIN_FILE, (self.blocks, self.seq_len))

    def val(self) -> np.ndarray:
        return self._map(VAL_FILE, (self.val_tokens,))

    def _map(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        import numpy as np

        if not all(shape):
            return np.zeros(shape, dtype=self.dtype)
        return np.memmap(self.directory / name, dtype=self.dtype, mode="r", shape=shape)


def open_token_shards(path: Path) -> TokenShards:
    """The tokenize output at `path`, its record sealed and its files the sizes it records.

    Checksums are `verify`'s job (they read every byte); sizes are enough to
    memory-map the files safely."""
    record, problem = read_sealed(path / RECORD_FILE)
    if problem:
        raise CheckpointError(f"{path}: {problem}; tokenize the data again")
    if record.get("kind") != KIND:
        raise CheckpointError(f"{path / RECORD_FILE}: not a tokenize output (kind {record.get('kind')!r})")
    shards = TokenShards(path, record)
    width = shards.dtype.itemsize
    for name, tokens in ((TRAIN_FILE, shards.blocks * shards.seq_len), (VAL_FILE, shards.val_tokens)):
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size != tokens * width:
            found = "missing" if size is None else f"{size} bytes"
            raise CheckpointError(
                f"{file}: {found}, but {RECORD_FILE} records {tokens} tokens of {width} bytes; "
                "the file was cut short or changed: tokenize the data again"
            )
    return shards


def largest_token(tokens: np.ndarray) -> int:
    """The largest id in `tokens` (-1 when empty), read a slice at a time."""
    flat = tokens.reshape(-1)
    largest = -1
    for start in range(0, len(flat), SCAN_TOKENS):
        largest = max(largest, int(flat[start : start + SCAN_TOKENS].max()))
    return largest
