"""`layersplice tokenize`: tokenize a corpus once, with every core, into the
files that `distill --data` memory-maps (checkpoint/token_shards.py).

Documents, the EOS after each, the validation split and the packing are
distill's own: the held-out documents' tokens (data.eos_tokenizer, the
holdout.Holdout rule) go to val.bin, and every later document's tokens,
concatenated, to train.bin, cut after the last whole --seq-len block. So
`distill --data TOKENS` trains on exactly the blocks that `distill --data` of
the same text packs.

The main process reads the documents in order; a pool of worker processes
tokenizes them a batch at a time, and the batches are written back in order.
At most TASKS_PER_WORKER batches per worker are in flight, so memory stays
bounded on any corpus. The workers are forked from the main process, which has
the tokenizer loaded already (spawning them would import transformers and
torch again in each). The output appears atomically, sealed like a build.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from blake3 import blake3

from layersplice import __version__
from layersplice.checkpoint.atomic import atomic_directory
from layersplice.checkpoint.digest import blake3_file
from layersplice.checkpoint.sealed_json import write_sealed
from layersplice.checkpoint.token_shards import KIND, RECORD_FILE, TRAIN_FILE, VAL_FILE, token_dtype
from layersplice.distill.config import DataSpec
from layersplice.distill.data import DOCS_PER_TOKENIZE, Tokenize, eos_tokenizer
from layersplice.distill.holdout import DataCounts, Holdout
from layersplice.distill.sources import Corpus, FileCorpus, FileSource
from layersplice.output.family import file_record

# The files that decide how text becomes ids (chat templates and generation
# settings do not): the tokenizer's digest covers these, by name and content.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
)
TASKS_PER_WORKER = 2


@dataclass(frozen=True)
class TokenizerSource:
    """The teacher whose tokenizer is used: where it was read, and how the record names it."""

    directory: Path
    name: str  # its Hub repo (read from the Hub, or declared by --teacher-id), else the path given
    revision: str | None  # the Hub commit or revision, when it has one


def tokenizer_digest(directory: Path) -> dict:
    """{"digest": BLAKE3 over the tokenizer files' names and contents, "files": their names}."""
    files = [name for name in TOKENIZER_FILES if (directory / name).is_file()]
    combined = blake3()
    for name in files:
        combined.update(f"{name}\0{blake3_file(directory / name)}\0".encode())
    return {"digest": f"blake3:{combined.hexdigest()}", "files": files}


_worker_tokenize: Tokenize | None = None  # set in the parent before the pool forks


def _one_thread() -> None:
    """In a worker: one process a core already; the tokenizer's own threads would only compete."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.uint32) for ids in _worker_tokenize(texts)]


def encoded_documents(corpus: Corpus, tokenize: Tokenize, processes: int) -> Iterator[np.ndarray]:
    """Every document's token ids (EOS included), in corpus order, tokenized by `processes` workers."""
    global _worker_tokenize
    documents = corpus.documents(0)
    batches = iter(lambda: list(itertools.islice(documents, DOCS_PER_TOKENIZE)), [])
    if processes <= 1:
        for texts in batches:
            yield from (np.asarray(ids, dtype=np.uint32) for ids in tokenize(texts))
        return
    _worker_tokenize = tokenize
    with multiprocessing.get_context("fork").Pool(processes, initializer=_one_thread) as pool:
        pending: deque = deque()
        for texts in batches:
            pending.append(pool.apply_async(_encode, (texts,)))
            if len(pending) >= TASKS_PER_WORKER * processes:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def write_tokens(directory: Path, documents: Iterator[np.ndarray], split: Holdout, spec: DataSpec,
                 vocab_size: int, advance: Callable[[], None]) -> DataCounts:
    """val.bin and train.bin in `directory`; the counts of what went where."""
    dtype = np.dtype(token_dtype(vocab_size)).newbyteorder("<")
    with (directory / VAL_FILE).open("wb") as val, (directory / TRAIN_FILE).open("wb") as train:
        for tokens in documents:
            if split.takes(len(tokens)):
                val.write(tokens[: split.kept(len(tokens))].astype(dtype).tobytes())
            else:
                train.write(tokens.astype(dtype).tobytes())
            advance()
    counts = split.counts(spec.seq_len)
    os.truncate(directory / TRAIN_FILE, counts.blocks * spec.seq_len * dtype.itemsize)
    return counts


def tokenize_corpus(spec: DataSpec, corpus: Corpus, teacher: TokenizerSource, tokenizer, out: Path,
                    processes: int, force: bool, advance: Callable[[], None]) -> dict:
    """Write the tokenize output of `corpus` to `out` atomically; its sealed record."""
    tokenize = eos_tokenizer(tokenizer)
    split = Holdout(spec, len(corpus) if isinstance(corpus, FileCorpus) else None)
    inputs = [("--data", path) for path in spec.files] + [("--teacher", teacher.directory)]
    with atomic_directory(out, force, inputs=inputs) as tmp:
        documents = encoded_documents(corpus, tokenize, processes)
        counts = write_tokens(tmp, documents, split, spec, len(tokenizer), advance)
        record = _record(spec, corpus, teacher, tokenizer, counts)
        record["files"] = {name: file_record(tmp / name) for name in (TRAIN_FILE, VAL_FILE)}
        write_sealed(tmp / RECORD_FILE, record)
    return record


def _record(spec: DataSpec, corpus: Corpus, teacher: TokenizerSource, tokenizer, counts: DataCounts) -> dict:
    return {
        "kind": KIND,
        "layersplice_version": __version__,
        "dtype": token_dtype(len(tokenizer)),
        "seq_len": spec.seq_len,
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer": {"from": teacher.name, "revision": teacher.revision, "vocab_size": len(tokenizer),
                      **tokenizer_digest(teacher.directory)},
        "sources": _sources(spec, corpus),
        "documents": counts.documents,
        "tokens": counts.tokens,
        "validation": {"documents": counts.held_documents, "tokens": counts.held_tokens,
                       "val_tokens": spec.val_tokens, "val_fraction": spec.val_fraction},
        "train": {"documents": counts.train_documents, "tokens": counts.train_tokens, "blocks": counts.blocks},
    }


def _sources(spec: DataSpec, corpus: Corpus) -> dict:
    """What was read: each local file with its size and checksum, or the streamed dataset's name."""
    described: dict = {"text_field": spec.text_field}
    if isinstance(corpus, FileCorpus):
        described["data"] = [_source(source) for source in corpus.sources]
    else:
        described |= {"dataset": spec.dataset, "dataset_config": spec.dataset_config, "split": spec.split}
    return described


def _source(source: FileSource) -> dict:
    if source.path.is_dir():  # a saved dataset
        return {"path": str(source.path), "split": source.split}
    return {"path": str(source.path), **file_record(source.path)}
