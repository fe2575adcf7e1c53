"""`layersplice tokenize`: the click edge of distill/tokens.py (loaded only when called,
as it needs transformers for the teacher's tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from layersplice.checkpoint.source import pinned_revision, resolve_declared
from layersplice.cli.options import data_source_options, force_option, holdout_options, model_options, with_options
from layersplice.distill.config import DEFAULT_VAL_TOKENS, DataSpec
from layersplice.distill.models import teacher_tokenizer
from layersplice.distill.sources import FileCorpus, open_corpus
from layersplice.distill.survey import check_documents
from layersplice.distill.tokens import TokenizerSource, tokenize_corpus

REDRAW_EVERY = 256  # documents between redraws of the progress bar


@click.command("tokenize")
@with_options(*model_options("teacher", required=True))
@click.option("--data", "files", multiple=True, type=click.Path(path_type=Path),
              help="Text: .txt (one document a file), .jsonl, .parquet, a directory of them, "
                   "or a saved datasets directory. Repeatable; read in the order given.")
@data_source_options
@click.option("--seq-len", type=int, default=2048, show_default=True,
              help="Tokens a training block; distill reads the output with this --seq-len only.")
@holdout_options(DEFAULT_VAL_TOKENS)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory: train.bin, val.bin and the sealed layersplice.json.")
@click.option("--num-proc", type=click.IntRange(min=1),
              help="Processes that tokenize [default: every core this process may run on].")
@force_option
def tokenize_command(teacher, teacher_revision, teacher_id, files, dataset, dataset_config, split, text_field,
                     seq_len, val_tokens, val_fraction, out, num_proc, force) -> None:
    """Tokenize text once, with every core, for `distill --data OUT`.

    Documents are tokenized with the tokenizer of the teacher you will
    distill from (its digest is recorded, so that distill refuses a teacher
    with another tokenizer; a Hub id is fetched into the Hugging Face cache as
    distill fetches it), an EOS after each, the first ones held out for
    validation (--val-tokens or --val-fraction), and the rest packed into
    --seq-len blocks exactly as distill packs raw text. Every document is
    read and checked before tokenizing starts. The
    output appears atomically, its files checksummed in a sealed
    layersplice.json; `layersplice verify OUT` checks it. Distill then reads
    each block from a memory map, shuffled over all blocks each epoch, and
    tokenizes nothing while it trains.

    \b
    Examples:
      layersplice tokenize --teacher T --data YOUR_CORPUS/ --seq-len 2048 --out corpus-tokens
      layersplice distill --teacher T --student S --data corpus-tokens --seq-len 2048 --out run1
    """
    spec = DataSpec(files=tuple(files), dataset=dataset, dataset_config=dataset_config, split=split,
                    text_field=text_field, seq_len=seq_len, val_tokens=val_tokens, val_fraction=val_fraction)
    console = Console(stderr=True, highlight=False)
    source = _teacher(teacher, teacher_revision, teacher_id)
    tokenizer = teacher_tokenizer(source.directory)
    corpus = open_corpus(spec)
    with console.status("reading and checking every document"):
        checked = check_documents(corpus)
    processes = num_proc or len(os.sched_getaffinity(0))
    total = len(corpus) if isinstance(corpus, FileCorpus) else None
    console.print(f"tokenize: {checked:,} documents checked; tokenizing with {processes} process(es)")
    progress = Progress(TextColumn("tokenize"), BarColumn(), MofNCompleteColumn(), TextColumn("documents"),
                        TimeElapsedColumn(), console=console, auto_refresh=False)
    with progress:
        task = progress.add_task("tokenize", total=total)

        def advance() -> None:
            progress.advance(task)
            if progress.tasks[0].completed % REDRAW_EVERY == 0:
                progress.refresh()

        record = tokenize_corpus(spec, corpus, source, tokenizer, out, processes, force, advance)
        progress.refresh()
    held, train = record["validation"], record["train"]
    dropped = train["tokens"] - train["blocks"] * seq_len
    console.print(
        f"wrote {out}: {record['documents']:,} documents, {record['tokens']:,} tokens; held out for validation "
        f"{held['documents']:,} documents, {held['tokens']:,} tokens; {train['blocks']:,} training blocks of "
        f"{seq_len:,} tokens ({dropped:,} tokens after the last whole block left out)", soft_wrap=True,
    )


def _teacher(reference: str, revision: str | None, hub_id: str | None) -> TokenizerSource:
    """The teacher named by path or Hub id (resolved as distill resolves it), named in the record by its Hub
    repo where it has one."""
    directory, declared, revision = resolve_declared(reference, revision, hub_id, "--teacher")
    return TokenizerSource(directory, declared or reference, pinned_revision(reference, directory, revision))
