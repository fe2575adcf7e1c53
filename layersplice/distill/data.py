"""Token blocks for distillation: tokenize with the teacher's tokenizer, pack
documents into --seq-len blocks with EOS separators, hold out the first
documents for validation, and serve training blocks in a seeded order.

The training stream of raw text is the corpus, epoch after epoch, cut into
full blocks (the tail of an epoch that does not fill a block is dropped). It
is shuffled inside windows of --shuffle-window blocks; window k is permuted by
`shuffled(window, seed, k)`. Its position is (window start in the corpus,
blocks taken from the window): a checkpoint stores that, and resume rebuilds
one window. A `layersplice tokenize` output (token_stream.py) permutes all the
blocks of epoch k by `shuffled(blocks, seed, k)`, so raw text read with a
window of exactly one epoch's blocks gives the same blocks in the same order.

A streamed dataset is split between the processes (sources.StreamShare):
each packs and shuffles its own share. Local files and tokenized data are
read whole by every process, which keeps its slice of each global batch, so
the batches do not depend on the number of processes.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from layersplice.checkpoint.token_shards import open_token_shards
from layersplice.distill.config import DataError, DataSpec
from layersplice.distill.holdout import Holdout, too_little_data
from layersplice.distill.sources import (
    Corpus, FileCorpus, StreamedCorpus, StreamShare, open_corpus, tokenized_input,
)
from layersplice.distill.token_stream import TokenStream, shuffled

DOCS_PER_TOKENIZE = 64


@dataclass(frozen=True)
class Batch:
    """Token ids and the mask of real (non-padding) tokens; `padded` says the mask has zeros."""

    ids: torch.Tensor
    mask: torch.Tensor
    padded: bool

    def to(self, device: torch.device) -> Batch:
        return Batch(self.ids.to(device), self.mask.to(device), self.padded)


@dataclass(frozen=True)
class StreamPosition:
    """A place in the training stream: the next token is token `offset` of document `doc`."""

    epoch: int
    doc: int
    offset: int


Tokenize = Callable[[list[str]], list[list[int]]]


def eos_tokenizer(tokenizer) -> Tokenize:
    """Documents -> token ids, each document followed by the EOS separator."""
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the teacher's tokenizer has no EOS token to separate packed documents; "
            "set eos_token in its tokenizer_config.json"
        )
    eos = tokenizer.eos_token_id

    def tokenize(texts: list[str]) -> list[list[int]]:
        encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [ids + [eos] if text else [] for text, ids in zip(texts, encoded)]

    return tokenize


def token_documents(corpus: Corpus, tokenize: Tokenize, start: int) -> Iterator[list[int]]:
    """Token ids of each document from index `start` on, tokenized a batch at a time."""
    documents = corpus.documents(start)
    while texts := list(itertools.islice(documents, DOCS_PER_TOKENIZE)):
        yield from tokenize(texts)


def pack(
    corpus: Corpus, tokenize: Tokenize, seq_len: int, first_doc: int, start: StreamPosition
) -> Iterator[tuple[torch.Tensor, StreamPosition]]:
    """Full blocks from `start` on, each with the position right after it; endless.

    An epoch runs over documents first_doc.. of the corpus; the tail that does
    not fill a block is dropped and the next epoch starts at first_doc again.
    """
    position = start
    while True:
        whole_epoch = position.doc == first_doc and position.offset == 0
        block: list[int] = []
        produced = False
        documents = token_documents(corpus, tokenize, position.doc)
        for doc, tokens in enumerate(documents, position.doc):
            offset = position.offset if doc == position.doc else 0
            while offset < len(tokens):
                taken = tokens[offset : offset + seq_len - len(block)]
                block.extend(taken)
                offset += len(taken)
                if len(block) == seq_len:
                    produced = True
                    after = (position.epoch, doc, offset) if offset < len(tokens) else (position.epoch, doc + 1, 0)
                    yield torch.tensor(block, dtype=torch.long), StreamPosition(*after)
                    block = []
        if whole_epoch and not produced:
            raise too_little_data(seq_len)
        position = StreamPosition(position.epoch + 1, first_doc, 0)


def rank_slice(blocks: torch.Tensor, rank: int, processes: int) -> torch.Tensor:
    """Process `rank`'s consecutive share of a global batch."""
    share = len(blocks) // processes
    return blocks[rank * share : (rank + 1) * share]


class TrainStream:
    """Training blocks in windows shuffled by (seed, window index); resumable.

    `per_rank`: the stream is this process's own share of the data (a split
    streamed dataset), so it serves a whole share rather than a slice of a
    global batch, and its position is its own."""

    def __init__(self, blocks_from: Callable[[StreamPosition], Iterator], start: StreamPosition,
                 window: int, seed: int, per_rank: bool = False) -> None:
        self.blocks_from, self.window, self.seed, self.per_rank = blocks_from, window, seed, per_rank
        self.window_index = -1  # no window loaded yet
        self.window_start = start
        self.taken = 0
        self._order: list[torch.Tensor] = []
        self._blocks: Iterator | None = None
        self._next_start = start

    def next_blocks(self, count: int) -> torch.Tensor:
        """The next `count` blocks as a (count, seq_len) tensor."""
        rows = []
        for _ in range(count):
            if self.taken == len(self._order):
                self._load_window(self.window_index + 1, self._next_start, 0)
            rows.append(self._order[self.taken])
            self.taken += 1
        return torch.stack(rows)

    def next_share(self, batch_size: int, rank: int, processes: int) -> torch.Tensor:
        """This process's blocks of the next global batch."""
        if self.per_rank:
            return self.next_blocks(batch_size // processes)
        return rank_slice(self.next_blocks(batch_size), rank, processes)

    def _load_window(self, index: int, start: StreamPosition, taken: int) -> None:
        if self._blocks is None or start != self._next_start:
            self._blocks = self.blocks_from(start)
        window = list(itertools.islice(self._blocks, self.window))
        self._next_start = window[-1][1]
        self._order = [window[i][0] for i in shuffled(len(window), self.seed, index)]
        self.window_index, self.window_start, self.taken = index, start, taken

    def state_dict(self) -> dict:
        return {"window_index": self.window_index, "window_start": asdict(self.window_start),
                "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        start = StreamPosition(**state["window_start"])
        if state["window_index"] >= 0:
            self._load_window(state["window_index"], start, state["taken"])
        else:
            self._next_start = self.window_start = start


class SyntheticStream:
    """Uniform random tokens; block i of stream `name` comes from a generator seeded with (seed, name, i)."""

    per_rank = False

    def __init__(self, vocab_size: int, seq_len: int, seed: int, name: str) -> None:
        self.vocab_size, self.seq_len, self.seed, self.name = vocab_size, seq_len, seed, name
        self.taken = 0

    def block(self, index: int) -> torch.Tensor:
        seed = random.Random(f"{self.seed}:{self.name}:{index}").getrandbits(63)
        return torch.randint(self.vocab_size, (self.seq_len,), generator=torch.Generator().manual_seed(seed))

    def next_blocks(self, count: int) -> torch.Tensor:
        return self._blocks(range(self.taken, self.taken + count), count)

    def next_share(self, batch_size: int, rank: int, processes: int) -> torch.Tensor:
        """This process's blocks of the next global batch; only those are drawn."""
        share = batch_size // processes
        first = self.taken + rank * share
        return self._blocks(range(first, first + share), batch_size)

    def _blocks(self, indices: range, advance: int) -> torch.Tensor:
        rows = [self.block(i) for i in indices]
        self.taken += advance
        return torch.stack(rows) if rows else torch.empty((0, self.seq_len), dtype=torch.long)

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken = state["taken"]


@dataclass
class DistillData:
    """Validation blocks (padded at the end), the training stream and what was held out."""

    val: Batch
    train: TrainStream | SyntheticStream | TokenStream
    held_documents: int | None = None


def load_data(spec: DataSpec, tokenizer, vocab_size: int, rank: int = 0, processes: int = 1) -> DistillData:
    """The data a DataSpec names, tokenized by the teacher's tokenizer, for process `rank` of `processes`."""
    if spec.synthetic:
        blocks = -(-spec.held_out_tokens // spec.seq_len)
        val_ids = SyntheticStream(vocab_size, spec.seq_len, spec.seed, "val").next_blocks(blocks)
        val = Batch(val_ids, torch.ones_like(val_ids, dtype=torch.bool), padded=False)
        return DistillData(val, SyntheticStream(vocab_size, spec.seq_len, spec.seed, "train"))
    tokenized = tokenized_input(spec)
    if tokenized is not None:
        shards = open_token_shards(tokenized)
        val = pack_padded(shards.val().astype(np.int64), spec.seq_len, pad_id=shards.record["eos_token_id"])
        return DistillData(val, TokenStream(shards, spec.seed), shards.record["validation"]["documents"])
    corpus = open_corpus(spec)
    tokenize = eos_tokenizer(tokenizer)
    val_docs, val_tokens = hold_out(corpus, tokenize, spec)
    val = pack_padded(val_tokens, spec.seq_len, pad_id=tokenizer.eos_token_id)
    if isinstance(corpus, StreamedCorpus):
        share = StreamShare(corpus, rank, processes, held_out=val_docs)
        corpus, first_doc, per_rank = share, 0, True
    else:
        first_doc, per_rank = val_docs, False

    def blocks_from(start: StreamPosition) -> Iterator:
        return pack(corpus, tokenize, spec.seq_len, first_doc, start)

    train = TrainStream(blocks_from, StreamPosition(0, first_doc, 0), spec.shuffle_window, spec.seed, per_rank)
    return DistillData(val, train, val_docs)


def hold_out(corpus: Corpus, tokenize: Tokenize, spec: DataSpec) -> tuple[int, list[int]]:
    """(number of leading documents held out, their tokens up to the budget)."""
    split = Holdout(spec, len(corpus) if isinstance(corpus, FileCorpus) else None)
    tokens: list[int] = []
    for document in token_documents(corpus, tokenize, 0):
        if not split.takes(len(document)):
            break
        tokens.extend(document[: split.kept(len(document))])
    else:
        split.check()
    return split.held_documents, tokens


def pack_padded(tokens: list[int], seq_len: int, pad_id: int) -> Batch:
    """Blocks of `tokens`, the last one padded and masked."""
    blocks = -(-len(tokens) // seq_len)
    ids = torch.full((blocks, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((blocks, seq_len), dtype=torch.bool)
    ids.view(-1)[: len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
    mask.view(-1)[: len(tokens)] = True
    return Batch(ids, mask, padded=len(tokens) < blocks * seq_len)
