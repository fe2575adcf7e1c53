"""build and init-student: the commands that write checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

import click
from rich.console import Console

from layersplice.checkpoint.source import declare_hub_id
from layersplice.cli import display
from layersplice.cli.options import (
    DTYPE_CHOICES,
    Sources,
    alignment_options,
    alignment_specs,
    allow_pickle_option,
    arch_option,
    choice_options,
    choose,
    dtype_option,
    err_console,
    family_name,
    force_option,
    hub_owner_option,
    json_option,
    model_options,
    name_option,
    no_card_option,
    recipe_option,
    shard_size_option,
    source_options,
    with_options,
    with_sources,
)
from layersplice.errors import LayerspliceError
from layersplice.checkpoint.source import Checkpoint
from layersplice.output.build import build_all, build_one, build_part, init_student
from layersplice.output.source_card import read_source_card
from layersplice.output.family import FamilyProblem, assemble
from layersplice.planning.alignment import AlignmentSpec, parse_layer_list, resolve_alignment
from layersplice.planning.job import single_layout
from layersplice.planning.plan import PlannedTensor, make_plan, student_init_plan
from layersplice.planning.recipe import load_recipe, model_reference
from layersplice.planning.sizes import all_plans
from layersplice.units import parse_bytes

console = Console()


@click.command()
@source_options
@choice_options
@click.option("--all", "all_sizes", is_flag=True, help="Write every size to OUT/<name>-<layers>L/ plus OUT/manifest.json.")
@click.option("--sizes", help="With --all: only these sizes, as layer counts (e.g. 12,14,16), added to the family in OUT.")
@click.option("--out", type=click.Path(path_type=Path), help="Output directory. Default: the recipe's 'out'.")
@name_option
@shard_size_option
@force_option
@hub_owner_option
@no_card_option
@json_option
@with_sources
def build(sources: Sources, keep, patch, layers, blocks, params, max_bytes, all_sizes, sizes, out, name, force,
          hub_owner, no_card, as_json) -> None:
    """Write an interpolated Hugging Face checkpoint, shard by shard.

    Tensor bytes are copied straight from the teacher and student files (no
    decoding unless --dtype asks for a cast), so memory stays small whatever
    the model size. The output appears atomically, with a model card
    (README.md: Hub front matter, where each layer came from, the command
    that rebuilds it) unless --no-card.

    --all --sizes writes part of a family: runs into one OUT add their sizes
    to it, each leaving its record in OUT/parts/ and updating
    OUT/manifest.json (after copying parts from several machines together,
    run `layersplice assemble OUT`).

    \b
    Examples (from the root of a clone: recipes/ ships with the repository;
    `layersplice demo` writes out/demo/calibration.jsonl):
      layersplice build --recipe recipes/llama3.yaml --keep 12
      layersplice build --teacher ./teacher --student ./student --keep 4 --out ./mid
      layersplice build --recipe recipes/tiny.yaml --all --out sizes/
      layersplice build --recipe recipes/tiny.yaml --all --sizes 9,10,11,12 --out sizes/   (one part of a family)
      layersplice build --recipe recipes/tiny.yaml --keep 2 --out tiny-mid --json
      layersplice build --recipe recipes/qwen3.yaml --params 3B --out qwen3-3b
      layersplice build --recipe recipes/tiny.yaml --order kl --calib out/demo/calibration.jsonl --keep 2 --out tiny-kl
      layersplice build --recipe recipes/tiny.yaml --order search --calib out/demo/calibration.jsonl --all --out sizes/
    """
    if hub_owner:
        sources = dataclasses.replace(sources, job=dataclasses.replace(sources.job, hub_owner=hub_owner))
    job = sources.job
    name = family_name(sources, name)
    if not no_card:
        _note_source_card(job.teacher)
    if sizes is not None and not all_sizes:
        raise LayerspliceError("--sizes picks sizes of --all; add --all (or choose one size with --layers)")
    if all_sizes:
        if any(v is not None for v in (keep, patch, layers, blocks, params, max_bytes)):
            raise LayerspliceError("--all writes every size; drop --keep/--patch/--layers/--blocks/--params/--max-bytes")
        target = out or (Path("out") / name)
        built = _build_family(sources, target, name, sizes, force, not no_card)
        _report(built, target, as_json)
        return
    patched, choice = choose(sources, keep, patch, layers, blocks, params, max_bytes)
    plan = make_plan(job.pair, patched, job.cast)
    if out is None:
        if sources.recipe is None:
            raise LayerspliceError("say where to write: --out DIR (or use a recipe with an 'out' pattern)")
        out = sources.recipe.output_path(plan.n_layers)
    _note_a_slow_cast(plan.tensors)
    with display.progress_bar() as progress:
        task = progress.add_task(f"writing {out}", total=plan.nbytes)
        result = build_one(job, plan, out, choice, sources.shard_size, force, lambda n: progress.advance(task, n),
                           card=not no_card, inputs=sources.inputs)
    _report([result], out, as_json)


def _build_family(sources: Sources, target: Path, name: str, sizes: str | None, force: bool, card: bool) -> list:
    """build --all: the whole family atomically, or with --sizes the named sizes added to it."""
    job = sources.job
    plans = all_plans(job, sources.order)
    if sizes is not None:
        plans = _pick_sizes(plans, parse_layer_list(sizes))
    _note_a_slow_cast(t for _, plan in plans for t in plan.tensors)
    write = build_all if sizes is None else build_part
    with display.progress_bar() as progress:
        task = progress.add_task("writing all sizes", total=sum(plan.nbytes for _, plan in plans))
        return write(
            job, sources.order, target, name, sources.shard_size, force, order_record=sources.order_record,
            plans=plans, card=card, inputs=sources.inputs,
            progress=lambda n: progress.advance(task, n),
            on_size=lambda sub, plan, kept: progress.update(task, description=f"{'kept verified' if kept else 'writing'} {sub}"),
        )


def _pick_sizes(plans: list, layer_counts: tuple[int, ...]) -> list:
    by_layers = {plan.n_layers: (keep, plan) for keep, plan in plans}
    unknown = [n for n in layer_counts if n not in by_layers]
    if unknown:
        raise LayerspliceError(
            f"--sizes {unknown[0]}: no size of this family has {unknown[0]} layers; "
            f"choose among {','.join(map(str, sorted(by_layers)))} (`layersplice plan` lists them)"
        )
    return [by_layers[n] for n in sorted(set(layer_counts))]


def _report(built: list, where: Path, as_json: bool) -> None:
    if as_json:
        display.echo_json(display.built_json(built, where))
    else:
        display.built_table(console, built, where)


def _note_source_card(teacher: Checkpoint) -> None:
    """Say so once when the teacher's own card is too large, or not valid, to take its license from."""
    note = read_source_card(teacher).note
    if note is not None:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


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
@recipe_option
@with_options(*model_options("teacher"))
# The spelling before --teacher-revision, kept for scripts that use it.
@click.option("--revision", hidden=True, deprecated="use --teacher-revision instead")
@alignment_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the new student.")
@dtype_option
@shard_size_option
@arch_option
@force_option
@allow_pickle_option
@hub_owner_option
@no_card_option
@json_option
def init_student_command(recipe, teacher, teacher_revision, teacher_id, revision, copied_teacher_layers, first,
                         every, last, out, dtype, shard_size, arch_file, force, allow_pickle, hub_owner, no_card,
                         as_json) -> None:
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
    teacher_revision = teacher_revision or revision
    if recipe is not None:
        parsed, base = load_recipe(recipe)
        teacher = teacher or model_reference(parsed.teacher, base)
        teacher_revision = teacher_revision or parsed.teacher_revision
        teacher_id, hub_owner = teacher_id or parsed.teacher_id, hub_owner or parsed.hub_owner
        shard_size = shard_size or parsed.shard_size
        specs.append(parsed.alignment.spec(f"recipe {recipe}"))
    if teacher is None:
        raise LayerspliceError("name the teacher: --teacher T or --recipe R")
    specs.append(AlignmentSpec(rule=(1, 2, 2), origin="the reference default first=1 every=2 last=2"))
    checkpoint, layout = single_layout(teacher, teacher_revision, arch_file, allow_pickle)
    checkpoint = declare_hub_id(checkpoint, teacher_id, "--teacher-id")
    named = (("the teacher", checkpoint.directory), ("the recipe", recipe), ("--arch", arch_file))
    inputs = [(what, path) for what, path in named if path is not None]
    alignment, origin = resolve_alignment(specs, layout.n_layers, None)
    if not no_card:
        _note_source_card(checkpoint)
    cast = DTYPE_CHOICES[dtype] if dtype else None
    plan_bytes = student_init_plan(layout, alignment, cast).nbytes
    with display.progress_bar() as progress:
        task = progress.add_task(f"writing {out}", total=plan_bytes)
        result = init_student(checkpoint, layout, alignment, origin, out, cast, parse_bytes(shard_size or "5GB"),
                              force, lambda n: progress.advance(task, n), card=not no_card, inputs=inputs,
                              hub_owner=hub_owner)
    err_console.print(f"student of teacher layers {','.join(map(str, alignment.copied))} ({origin})", highlight=False)
    _report([result], out, as_json)


@click.command("assemble")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@json_option
def assemble_command(out: Path, as_json: bool) -> None:
    """Write OUT/manifest.json for every size that the parts in OUT/parts/ record.

    Run it after copying the outputs of several `build --all --sizes` jobs
    into one folder: each job's manifest.json overwrote the others', but each
    job's own record in OUT/parts/ survived. Parts built in sequence into one
    OUT need no assembling; `verify` says when it is needed.

    \b
    Example (from the root of a clone: recipes/ ships with the repository):
      layersplice build --recipe recipes/tiny.yaml --all --sizes 9,10,11,12 --out part-a
      layersplice build --recipe recipes/tiny.yaml --all --sizes 13,14,15,16 --out part-b
      cp -r part-a/. family/ && cp -r part-b/. family/
      layersplice assemble family && layersplice verify family
    """
    try:
        manifest = assemble(out)
    except FamilyProblem as exc:
        raise LayerspliceError(f"{out}: {exc}") from None
    if as_json:
        display.echo_json(manifest)
    else:
        sizes = ", ".join(entry["directory"] for entry in manifest["sizes"])
        console.print(f"wrote {out / 'manifest.json'}: {len(manifest['sizes'])} sizes ({sizes}) from {len(manifest['parts'])} parts", highlight=False)
