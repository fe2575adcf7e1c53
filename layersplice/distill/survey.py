"""Before any model loads: read every document, check it, and count what the data holds.

Local files are read whole (every document decoded as UTF-8, every row's text
field checked) and tokenized to count their tokens, by a pool of processes as
`tokenize` does (rank 0 does it while the others wait: a large corpus is
better tokenized once, with `layersplice tokenize`); of a streamed dataset,
only the first STREAM_CHECK_DOCUMENTS can be read ahead; a tokenize output's
record is checked against the run (the teacher's tokenizer, --seq-len). A bad
document is a DataError naming its file and line before a model is loaded or
anything is written. The counts become the summary a run prints at start.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from layersplice.checkpoint.token_shards import open_token_shards
from layersplice.distill.config import DataError, DataSpec, DistillConfig
from layersplice.distill.data import DistillData, eos_tokenizer
from layersplice.distill.holdout import DataCounts, Holdout
from layersplice.distill.sources import Corpus, StreamedCorpus, open_corpus, tokenized_input
from layersplice.distill.tokens import encoded_documents, tokenizer_digest

STREAM_CHECK_DOCUMENTS = 1000


@dataclass(frozen=True)
class Survey:
    """What the data is (for the summary), its counts when known before training, and how much was checked."""

    source: str
    counts: DataCounts | None
    checked: int
    tokenized: bool = False


def check_documents(corpus: Corpus) -> int:
    """Read and check every document (the first STREAM_CHECK_DOCUMENTS of a streamed dataset); how many."""
    documents = corpus.documents(0)
    if isinstance(corpus, StreamedCorpus):
        documents = itertools.islice(documents, STREAM_CHECK_DOCUMENTS)
    return sum(1 for _ in documents)


def survey_data(spec: DataSpec, teacher: Path, tokenizer, processes: int = 1) -> Survey:
    """Check the data a run names and count it, tokenizing with `processes` workers; raises DataError on the first problem."""
    if spec.synthetic:
        return Survey("random tokens (--synthetic-data)", None, 0)
    tokenized = tokenized_input(spec)
    if tokenized is not None:
        return _survey_tokenized(spec, tokenized, teacher)
    corpus = open_corpus(spec)
    if isinstance(corpus, StreamedCorpus):
        return Survey(f"--dataset {spec.dataset} (streamed)", None, check_documents(corpus))
    split = Holdout(spec, len(corpus))
    for document in encoded_documents(corpus, eos_tokenizer(tokenizer), processes):
        split.takes(len(document))
    counts = split.counts(spec.seq_len)
    return Survey(_paths(spec.files), counts, counts.documents)


def _paths(files: tuple[Path, ...]) -> str:
    shown = ", ".join(str(path) for path in files[:3])
    return f"--data {shown}" + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def _survey_tokenized(spec: DataSpec, path: Path, teacher: Path) -> Survey:
    shards = open_token_shards(path)
    record = shards.record
    held = record["validation"]
    if spec.val_tokens is not None or spec.val_fraction is not None:
        raise DataError(
            f"--data {path} is tokenized, with its validation split made then ({held['documents']} documents, "
            f"{held['tokens']} tokens): drop --val-tokens / --val-fraction, or tokenize again with them"
        )
    if shards.seq_len != spec.seq_len:
        raise DataError(
            f"--data {path} holds blocks of {shards.seq_len} tokens, not --seq-len {spec.seq_len}; pass "
            f"--seq-len {shards.seq_len}, or tokenize again with --seq-len {spec.seq_len}"
        )
    if tokenizer_digest(teacher)["digest"] != record["tokenizer"]["digest"]:
        raise DataError(
            f"--data {path} was tokenized with the tokenizer of {record['tokenizer']['from']}, whose files "
            f"differ from --teacher {teacher}'s; tokenize the text again with --teacher {teacher}"
        )
    train = record["train"]
    counts = DataCounts(
        documents=record["documents"], tokens=record["tokens"], held_documents=held["documents"],
        held_tokens=held["tokens"], train_documents=train["documents"], train_tokens=train["tokens"],
        seq_len=shards.seq_len,
    )
    return Survey(f"--data {path} (tokenized)", counts, 0, tokenized=True)


def data_summary(survey: Survey, data: DistillData, config: DistillConfig) -> str:
    """The data line a run prints at start: what was found, held out, and how many epochs the steps take."""
    spec, steps, batch = config.data, config.steps, config.batch_size
    run = f"{steps:,} steps x {batch:,} blocks of {spec.seq_len:,} tokens"
    if spec.synthetic:
        return f"data: {survey.source}; {run}"
    counts = survey.counts
    held_tokens = int(data.val.mask.sum())
    held = f"held out for validation: {data.held_documents:,} documents, {held_tokens:,} tokens"
    order = ("all blocks shuffled each epoch" if survey.tokenized
             else f"shuffled in windows of {spec.shuffle_window:,} blocks")
    if counts is None:
        return (f"data: {survey.source}, its size unknown until read (the first {survey.checked:,} documents "
                f"were checked); {held}; {run}, {order}")
    epochs = steps * batch / counts.blocks
    return (f"data: {survey.source}: {counts.documents:,} documents, {counts.tokens:,} tokens; {held}; "
            f"training: {counts.blocks:,} blocks of {spec.seq_len:,} tokens an epoch, {order}; "
            f"{run} take {epochs:,.3g} epochs")
