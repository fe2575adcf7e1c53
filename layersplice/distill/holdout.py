"""The validation split, one rule for every reader of the data: the first
documents are held out, up to --val-tokens tokens (default 262,144) or
--val-fraction of the documents; training is every document after them.

Distill's raw-text path, `layersplice tokenize` and the summary a run prints at
start all offer documents to one `Holdout`, so they agree on every count.
"""

from __future__ import annotations

from dataclasses import dataclass

from layersplice.distill.config import DataError, DataSpec


def too_little_data(seq_len: int) -> DataError:
    return DataError(
        f"the training data holds less than one --seq-len {seq_len} block after the "
        "validation split; give more data or lower --seq-len / --val-tokens"
    )


@dataclass(frozen=True)
class DataCounts:
    """What a corpus holds once split and cut into --seq-len blocks."""

    documents: int
    tokens: int
    held_documents: int
    held_tokens: int
    train_documents: int
    train_tokens: int
    seq_len: int

    @property
    def blocks(self) -> int:
        """Training blocks an epoch: the tail that does not fill a block is dropped."""
        return self.train_tokens // self.seq_len


class Holdout:
    """Decides, document by document in corpus order, which are held out, and counts both parts."""

    def __init__(self, spec: DataSpec, documents: int | None) -> None:
        if spec.val_fraction is not None:
            if documents is None:
                raise DataError("--val-fraction needs a corpus of known size; use --val-tokens with --dataset")
            self.docs, self.budget = round(spec.val_fraction * documents), None
        else:
            self.docs, self.budget = None, spec.held_out_tokens
        self.held_documents = self.held_tokens = 0
        self.train_documents = self.train_tokens = 0

    @property
    def closed(self) -> bool:
        """Whether the split is full: no later document is held out."""
        return self.train_documents > 0 or self.held_documents == self.docs or (
            self.budget is not None and self.held_tokens >= self.budget)

    def takes(self, length: int) -> bool:
        """Whether the next document, of `length` tokens, is held out (else it is for training)."""
        if self.closed:
            self.train_documents += 1
            self.train_tokens += length
            return False
        self.held_documents += 1
        self.held_tokens += length
        return True

    def kept(self, tokens: int) -> int:
        """How many of a held-out document's `tokens` (it was offered last) fit the budget."""
        if self.budget is None:
            return tokens
        return max(0, tokens - max(0, self.held_tokens - self.budget))

    def check(self) -> None:
        """After the last document: refuse a split that left nothing to train on."""
        if self.held_documents and not self.train_documents:
            raise DataError(
                f"the validation split takes all {self.held_documents} documents; lower --val-tokens or "
                "--val-fraction, or give more data"
            )

    def counts(self, seq_len: int) -> DataCounts:
        """The counts once every document was offered; refuses data with nothing to train on."""
        self.check()
        held = self.held_tokens if self.budget is None else min(self.held_tokens, self.budget)
        counts = DataCounts(
            documents=self.held_documents + self.train_documents,
            tokens=self.held_tokens + self.train_tokens,
            held_documents=self.held_documents, held_tokens=held,
            train_documents=self.train_documents, train_tokens=self.train_tokens, seq_len=seq_len,
        )
        if counts.blocks == 0:
            raise too_little_data(seq_len)
        return counts
