"""build and init-student: the commands that write checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from layersplice.cli import display
from layersplice.cli.options import (
    DTYPE_CHOICES,
    Sources,
    alignment_specs,
    allow_pickle_option,
    choice_options,
    choose,
    source_options,
    with_sources,
)
from layersplice.errors import LayerspliceError
from layersplice.output.build import build_all, build_one, init_student
from layersplice.planning.alignment import AlignmentSpec, resolve_alignment
from layersplice.planning.job import single_layout
from layersplice.planning.plan import PlannedTensor, make_plan, student_init_plan
from layersplice.planning.recipe import load_recipe, model_reference
from layersplice.planning.sizes import all_plans
from layersplice.units import parse_bytes

console = Console()


def _progress() -> Progress:
    return Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True,
    )


@click.command()
@source_options
@choice_options
@click.option("--all", "all_sizes", is_flag=True, help="Write every size to OUT/<name>-<layers>L/ plus OUT/manifest.json.")
@click.option("--out", type=click.Path(path_type=Path), help="Output directory. Default: the recipe's 'out'.")
@click.option("--name", help="Name used in --all subdirectories. Default: the recipe's name, else the teacher's folder name.")
@click.option("--shard-size", help="Largest shard, e.g. 5GB (default), 500MB, 2GiB.")
@click.option("--force", is_flag=True, help="Replace an existing layersplice output at --out.")
@with_sources
def build(sources: Sources, keep, patch, layers, blocks, params, max_bytes, all_sizes, out, name, force) -> None:
    """Write an interpolated Hugging Face checkpoint, shard by shard.

    Tensor bytes are copied straight from the teacher and student files (no
    decoding unless --dtype asks for a cast), so memory stays small whatever
    the model size. The output appears atomically.

    \b
    Examples:
      layersplice build --recipe recipes/llama3.yaml --keep 12
      layersplice build --teacher ./teacher --student ./student --keep 4 --out ./mid
      layersplice build --recipe recipes/tiny.yaml --all --out sizes/
      layersplice build --recipe recipes/qwen3.yaml --params 3B --out qwen3-3b
      layersplice build --recipe recipes/tiny.yaml --order kl --calib held-out.txt --keep 2 --out tiny-kl
    """
    job = sources.job
    name = name or (sources.recipe.name if sources.recipe else Path(job.teacher.directory).name)
    if all_sizes:
        if any(v is not None for v in (keep, patch, layers, blocks, params, max_bytes)):
            raise LayerspliceError("--all writes every size; drop --keep/--patch/--layers/--blocks/--params/--max-bytes")
        target = out or (Path("out") / name)
        plans = all_plans(job, sources.order)
        _note_a_slow_cast(t for _, plan in plans for t in plan.tensors)
        with _progress() as progress:
            task = progress.add_task("writing all sizes", total=sum(plan.nbytes for _, plan in plans))
            built = build_all(
                job, sources.order, target, name, sources.shard_size, force, order_record=sources.order_record,
                plans=plans, inputs=sources.inputs,
                progress=lambda n: progress.advance(task, n),
                on_size=lambda sub, plan, kept: progress.update(
                    task, description=f"{'kept verified' if kept else 'writing'} {sub}"),
            )
        display.built_table(console, built, target)
        return
    patched, choice = choose(sources, keep, patch, layers, blocks, params, max_bytes)
    plan = make_plan(job.pair, patched, job.cast)
    if out is None:
        if sources.recipe is None:
            raise LayerspliceError("say where to write: --out DIR (or use a recipe with an 'out' pattern)")
        out = sources.recipe.output_path(plan.n_layers)
    _note_a_slow_cast(plan.tensors)
    with _progress() as progress:
        task = progress.add_task(f"writing {out}", total=plan.nbytes)
        result = build_one(job, plan, out, choice, sources.shard_size, force, lambda n: progress.advance(task, n),
                           inputs=sources.inputs)
    display.built_table(console, [result], out)


def _note_a_slow_cast(tensors: Iterable[PlannedTensor]) -> None:
    """Say so when an F32 -> BF16 cast runs on numpy because the compiled loop is missing."""
    from layersplice.checkpoint.cast import native, switched_off

    if native() is not None or switched_off():
        return
    if any(t.source.dtype == "F32" and t.dtype == "BF16" for t in tensors):
        click.echo(
            "note: F32 -> BF16 conversion runs on numpy, several times slower: the compiled cast was not built "
            "at install; reinstall layersplice where a C compiler and Python headers exist",
            err=True,
        )


@click.command("init-student")
@click.option("--teacher", help="Teacher: local directory or Hugging Face repo id.")
@click.option("--revision", help="Hub revision of the teacher.")
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path), help="Take the teacher and alignment from a recipe.")
@click.option("--first", type=int, help="Leading one-layer blocks (reference default 1).")
@click.option("--every", type=int, help="Teacher layers per block (reference default 2).")
@click.option("--last", type=int, help="Trailing one-layer blocks (reference default 2).")
@click.option("--copied-teacher-layers", help="Exact teacher layers to keep, e.g. 0,2,4,5.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the new student.")
@click.option("--dtype", type=click.Choice(sorted(DTYPE_CHOICES)), help="Cast floating tensors.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest shard.")
@click.option("--arch", "arch_file", type=click.Path(dir_okay=False, path_type=Path), help="Family description YAML for an unknown model.")
@click.option("--force", is_flag=True, help="Replace an existing layersplice output at --out.")
@allow_pickle_option
def init_student_command(teacher, revision, recipe, first, every, last, copied_teacher_layers, out, dtype, shard_size, arch_file, force, allow_pickle) -> None:
    """Make the initial student from kept teacher layers (before distillation).

    Streams the kept layers (same machinery and memory bound as build),
    rewrites the config, copies the tokenizer and writes student_config.json
    in the reference format. Without an alignment the reference's rule
    first=1 every=2 last=2 is used.

    \b
    Example:
      layersplice init-student --teacher Qwen/Qwen3-4B --out qwen3-student --first 1 --every 2 --last 2
    """
    specs = alignment_specs(copied_teacher_layers, first, every, last)
    if recipe is not None:
        parsed, base = load_recipe(recipe)
        teacher = teacher or model_reference(parsed.teacher, base)
        revision = revision or parsed.teacher_revision
        specs.append(parsed.alignment.spec(f"recipe {recipe}"))
    if teacher is None:
        raise LayerspliceError("name the teacher: --teacher T or --recipe R")
    specs.append(AlignmentSpec(rule=(1, 2, 2), origin="the reference default first=1 every=2 last=2"))
    checkpoint, layout = single_layout(teacher, revision, arch_file, allow_pickle)
    named = (("the teacher", checkpoint.directory), ("the recipe", recipe), ("--arch", arch_file))
    inputs = [(what, path) for what, path in named if path is not None]
    alignment, origin = resolve_alignment(specs, layout.n_layers, None)
    cast = DTYPE_CHOICES[dtype] if dtype else None
    plan_bytes = student_init_plan(layout, alignment, cast).nbytes
    with _progress() as progress:
        task = progress.add_task(f"writing {out}", total=plan_bytes)
        result = init_student(checkpoint, layout, alignment, origin, out, cast, parse_bytes(shard_size), force,
                              lambda n: progress.advance(task, n), inputs=inputs)
    console.print(f"student of teacher layers {','.join(map(str, alignment.copied))} ({origin})")
    display.built_table(console, [result], out)
