"""Token blocks for distillation: tokenize with the teacher's tokenizer, pack
documents into --seq-len blocks with EOS separators, hold out the first
documents for validation, and serve training blocks in a seeded order.

The training stream is the corpus, epoch after epoch, cut into full blocks (the
tail of an epoch that does not fill a block is dropped). It is shuffled inside
windows of --shuffle-window blocks; window k is permuted by a generator seeded
with (seed, k). Its position is (window start in the corpus, blocks taken from
the window): a checkpoint stores that, and resume rebuilds one window.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from layersplice.distill.config import DataError, DataSpec
from layersplice.distill.sources import Corpus, FileCorpus, open_corpus

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
            raise DataError(
                f"the training data holds less than one --seq-len {seq_len} block after the "
                "validation split; give more data or lower --seq-len / --val-tokens"
            )
        position = StreamPosition(position.epoch + 1, first_doc, 0)


class TrainStream:
    """Training blocks in windows shuffled by (seed, window index); resumable."""

    def __init__(self, blocks_from: Callable[[StreamPosition], Iterator], start: StreamPosition,
                 window: int, seed: int) -> None:
        self.blocks_from, self.window, self.seed = blocks_from, window, seed
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

    def _load_window(self, index: int, start: StreamPosition, taken: int) -> None:
        if self._blocks is None or start != self._next_start:
            self._blocks = self.blocks_from(start)
        window = list(itertools.islice(self._blocks, self.window))
        self._next_start = window[-1][1]
        self._order = [block for block, _ in window]
        random.Random(f"{self.seed}:{index}").shuffle(self._order)
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

    def __init__(self, vocab_size: int, seq_len: int, seed: int, name: str) -> None:
        self.vocab_size, self.seq_len, self.seed, self.name = vocab_size, seq_len, seed, name
        self.taken = 0

    def block(self, index: int) -> torch.Tensor:
        seed = random.Random(f"{self.seed}:{self.name}:{index}").getrandbits(63)
        return torch.randint(self.vocab_size, (self.seq_len,), generator=torch.Generator().manual_seed(seed))

    def next_blocks(self, count: int) -> torch.Tensor:
        rows = [self.block(self.taken + i) for i in range(count)]
        self.taken += count
        return torch.stack(rows) if rows else torch.empty((0, self.seq_len), dtype=torch.long)

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken = state["taken"]


@dataclass
class DistillData:
    """Validation blocks (padded at the end) and the training stream."""

    val: Batch
    train: TrainStream | SyntheticStream


def load_data(spec: DataSpec, tokenizer, vocab_size: int) -> DistillData:
    """The data a DataSpec names, tokenized by the teacher's tokenizer."""
    if spec.synthetic:
        blocks = -(-spec.held_out_tokens // spec.seq_len)
        val_ids = SyntheticStream(vocab_size, spec.seq_len, spec.seed, "val").next_blocks(blocks)
        val = Batch(val_ids, torch.ones_like(val_ids, dtype=torch.bool), padded=False)
        return DistillData(val, SyntheticStream(vocab_size, spec.seq_len, spec.seed, "train"))
    corpus = open_corpus(spec)
    tokenize = eos_tokenizer(tokenizer)
    val_docs, val_tokens = hold_out(corpus, tokenize, spec)
    val = pack_padded(val_tokens, spec.seq_len, pad_id=tokenizer.eos_token_id)

    def blocks_from(start: StreamPosition) -> Iterator:
        return pack(corpus, tokenize, spec.seq_len, val_docs, start)

    train = TrainStream(blocks_from, StreamPosition(0, val_docs, 0), spec.shuffle_window, spec.seed)
    return DistillData(val, train)


def hold_out(corpus: Corpus, tokenize: Tokenize, spec: DataSpec) -> tuple[int, list[int]]:
    """(number of leading documents held out, their tokens up to the budget)."""
    if spec.val_fraction is not None:
        if not isinstance(corpus, FileCorpus):
            raise DataError("--val-fraction needs a corpus of known size; use --val-tokens with --dataset")
        docs, budget = round(spec.val_fraction * len(corpus)), None
    else:
        docs, budget = None, spec.held_out_tokens
    tokens: list[int] = []
    count = 0
    for document in token_documents(corpus, tokenize, 0):
        if count == docs or (budget is not None and len(tokens) >= budget):
            break
        tokens.extend(document)
        count += 1
    else:
        if count:
            raise DataError(
                f"the validation split takes all {count} documents; lower --val-tokens or "
                "--val-fraction, or give more data"
            )
    return count, tokens[:budget]


def pack_padded(tokens: list[int], seq_len: int, pad_id: int) -> Batch:
    """Blocks of `tokens`, the last one padded and masked."""
    blocks = -(-len(tokens) // seq_len)
    ids = torch.full((blocks, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((blocks, seq_len), dtype=torch.bool)
    ids.view(-1)[: len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    mask.view(-1)[: len(tokens)] = True
    return Batch(ids, mask, padded=len(tokens) < blocks * seq_len)
