"""`layersplice distill`: the click edge of the distill loop.

Runnable as a module so that torchrun can start it directly:
    torchrun --nproc_per_node 8 -m layersplice.distill.command --teacher T ...
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import click

from layersplice.checkpoint.source import resolve_declared
from layersplice.checkpoint.strict_json import dumps
from layersplice.cli.options import (
    data_source_options,
    device_option,
    holdout_options,
    hub_owner_option,
    json_option,
    model_options,
    with_options,
)
from layersplice.distill.config import DEFAULT_VAL_TOKENS, DataSpec, DistillConfig
from layersplice.distill.losses import LossWeights
from layersplice.distill.run_file import read_config_file, run_settings
from layersplice.errors import LayerspliceError


def _default(cls, name: str):
    return next(f.default for f in fields(cls) if f.name == name)


_dir = click.Path(file_okay=False, path_type=Path)


@click.command("distill")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), is_eager=True,
              callback=read_config_file,
              help="YAML file of this command's options, keyed by option name with - as _ (seq_len: 2048, "
                   "data: [a.jsonl]); options given on the command line override it.")
@with_options(*model_options("teacher", required=True), *model_options("student", required=True))
@click.option("--out", type=_dir, required=True,
              help="Directory for the distilled student (with its model card and sealed layersplice.json, "
                   "so `layersplice verify` checks it) and metrics.jsonl; checkpoints/ while unfinished.")
@click.option("--data", "files", multiple=True, type=click.Path(path_type=Path),
              help="Text: .txt (one document a file), .jsonl, .parquet, a directory of them, "
                   "or a saved datasets directory. Repeatable. Or the output of `layersplice tokenize` "
                   "(alone), read from a memory map with no tokenizing.")
@data_source_options
@click.option("--synthetic-data", is_flag=True,
              help="Random tokens instead of text (benchmarks; needs no tokenizer).")
@click.option("--seq-len", type=int, default=_default(DataSpec, "seq_len"), show_default=True,
              help="Tokens per training sequence: documents are packed into blocks of this length "
                   "(at most the models' context).")
@holdout_options(DEFAULT_VAL_TOKENS)
@click.option("--shuffle-window", type=int, default=_default(DataSpec, "shuffle_window"),
              show_default=True, help="Training blocks of raw text are shuffled within windows of this "
                                      "many (tokenized data: across all blocks, each epoch).")
@click.option("--seed", type=int, default=_default(DataSpec, "seed"), show_default=True,
              help="Seed of the data shuffle and of every random number generator of the run.")
@click.option("--steps", type=int, default=_default(DistillConfig, "steps"), show_default=True,
              help="Optimizer steps.")
@click.option("--batch-size", type=int, default=_default(DistillConfig, "batch_size"),
              show_default=True, help="Global batch: sequences per optimizer step, all processes together.")
@click.option("--micro-batch-size", type=int, default=_default(DistillConfig, "micro_batch_size"),
              show_default=True, help="Sequences per forward pass on each process.")
@click.option("--lr", type=float, default=_default(DistillConfig, "lr"), show_default=True,
              help="Peak learning rate of AdamW (betas 0.9, 0.95), reached after --warmup, then cosine decay to 0.")
@click.option("--warmup", type=float, default=_default(DistillConfig, "warmup"), show_default=True,
              help="Warmup as a fraction of the steps.")
@click.option("--weight-decay", type=float, default=_default(DistillConfig, "weight_decay"),
              show_default=True, help="AdamW weight decay (not applied to biases and norm weights).")
@click.option("--grad-clip", type=float, default=_default(DistillConfig, "grad_clip"), show_default=True,
              help="Clip the gradients' global norm to this.")
@click.option("--kl-weight", type=float, default=LossWeights.kl, show_default=True,
              help="Weight of the KL term, KL(teacher || student) on the logits.")
@click.option("--temperature", type=float, default=LossWeights.temperature, show_default=True,
              help="Softmax temperature T of the KL term (the term is scaled by T^2).")
@click.option("--cos-weight", type=float, default=LossWeights.cos, show_default=True,
              help="Weight of the cosine term on the hidden states at block ends.")
@click.option("--eval-every", type=int, default=_default(DistillConfig, "eval_every"),
              show_default=True, help="Validate every N steps (and at the start and end); 0: never.")
@click.option("--save-every", type=int, default=_default(DistillConfig, "save_every"),
              show_default=True, help="Write a resume checkpoint every N steps; 0: never.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--keep-checkpoints", is_flag=True,
              help="Keep checkpoints/ (fp32 weights and optimizer state) once the run is done; by default a "
                   "finished run removes it, leaving --out as the sealed student and nothing else.")
@device_option
@click.option("--loss-chunk-tokens", type=int,
              help="CE and KL are computed from the final hidden states and the heads, this many "
                   "tokens at a time, so the full [tokens x vocabulary] logits never exist. "
                   "0: full logits (the plain computation; more memory) [default: about 2^24 "
                   "logits a chunk in multiples of 128 tokens: 128 at a 151,936-token vocabulary, "
                   "512 at 32,000].")
@click.option("--shard-teacher", is_flag=True,
              help="Under torchrun with several processes, shard the teacher with FSDP2 too "
                   "(for a teacher that does not fit on one device; it is replicated otherwise).")
@click.option("--compile", "compile_layers", is_flag=True,
              help="torch.compile each decoder layer (the first steps are slower while it compiles).")
@click.option("--activation-checkpointing", is_flag=True,
              help="Recompute each student decoder layer's activations in backward: less memory, "
                   "about a third more compute.")
@click.option("--peak-tflops", type=float,
              help="The device's peak TFLOP/s, for MFU on the progress line and in metrics.jsonl "
                   "[default: known for common GPUs (bf16 dense); none on CPU].")
@hub_owner_option
@json_option
def distill_command(config, teacher, student, teacher_revision, teacher_id, student_revision, student_id, out,
                    files, dataset,
                    dataset_config, split, text_field, synthetic_data, seq_len, val_tokens, val_fraction,
                    shuffle_window, seed, kl_weight, temperature, cos_weight, compile_layers, hub_owner, as_json,
                    **training) -> None:
    """Distill a student from its teacher (CE + KL + hidden-state cosine).

    The same command under torchrun with several processes shards the student
    with FSDP2 and gives each process a whole copy of the frozen teacher
    (--shard-teacher shards it too); the global batch, and so the result, does
    not depend on the number of processes.

    --out becomes a publishable student, like the outputs of build: a model
    card and a sealed layersplice.json that records the sources, the data and
    every setting, which `layersplice verify` checks.

    \b
    Examples:
      layersplice distill --teacher T --student S --data YOUR_CORPUS/ --out run1
      layersplice distill --config run.yaml --steps 100 --out run2   (the flag overrides the file)
      torchrun --nproc_per_node 8 -m layersplice.distill.command \\
          --teacher Qwen/Qwen3-4B --student S --dataset NAME --out run1 --compile
    """
    from layersplice.distill.loop import distill

    settings = run_settings(click.get_current_context())
    data = DataSpec(
        files=tuple(files), dataset=dataset, dataset_config=dataset_config, split=split,
        text_field=text_field, synthetic=synthetic_data, seq_len=seq_len, val_tokens=val_tokens,
        val_fraction=val_fraction, shuffle_window=shuffle_window, seed=seed,
    )
    loss = LossWeights(kl=kl_weight, temperature=temperature, cos=cos_weight)
    del hub_owner  # the card's: the seal reads it from the run's settings, as it reads --teacher-id
    record = distill(DistillConfig(
        teacher=_local("--teacher", teacher, teacher_revision, teacher_id),
        student=_local("--student", student, student_revision, student_id),
        out=out, data=data, loss=loss, compile=compile_layers, settings=settings, **training,
    ))
    if as_json and record is not None:
        click.echo(dumps(record))


def _local(flag: str, reference: str, revision: str | None, hub_id: str | None) -> Path:
    """The directory a model named by path or Hub id is read from, resolved as every command resolves it.

    A declared Hub id (--teacher-id, --student-id) is checked now, before the run, though only the card
    written at its end (seal.py) names it."""
    directory, _, _ = resolve_declared(reference, revision, hub_id, flag)
    return directory


if __name__ == "__main__":
    # Started by torchrun rather than the layersplice CLI: user errors still print as one line.
    try:
        distill_command(standalone_mode=False)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except LayerspliceError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
