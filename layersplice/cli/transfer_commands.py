"""transfer: the student of a post-trained variant from the base teacher's student, without distilling."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from layersplice.cli import display
from layersplice.cli.options import (
    alignment_options,
    alignment_specs,
    allow_pickle_option,
    arch_option,
    err_console,
    force_option,
    hub_owner_option,
    json_option,
    model_options,
    no_card_option,
    override_alignment_option,
    recipe_option,
    shard_size_option,
    with_options,
)
from layersplice.errors import LayerspliceError
from layersplice.planning.recipe import load_recipe, model_reference
from layersplice.planning.transfer import BASE, STUDENT, VARIANT, open_transfer
from layersplice.units import format_bytes, format_params, parse_bytes

console = Console()


@click.command()
@recipe_option
@with_options(*model_options("base-teacher"), *model_options("teacher", required=True), *model_options("student"))
@alignment_options
@override_alignment_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the variant's student.")
@shard_size_option
@force_option
@hub_owner_option
@no_card_option
@click.option("--report", is_flag=True, help="Print the cosine similarity of the two changes, per layer and in total.")
@json_option
@arch_option
@allow_pickle_option
def transfer(recipe, base_teacher, base_teacher_revision, base_teacher_id, teacher, teacher_revision, teacher_id,
             student, student_revision, student_id, copied_teacher_layers, first, every, last, override_alignment,
             out, shard_size, force, hub_owner, no_card, report, as_json, arch_file, allow_pickle) -> None:
    """Give a post-trained variant of the teacher its student, with no distillation.

    Distil once from the base teacher B; for a variant V of B (Instruct,
    Thinking, domain-tuned) the variant's student is

    \b
        init(V) + (S - init(B))

    where init(X) is the student init-student makes from X with the student's
    alignment (ADAPT, the boomerang authors' follow-up). --teacher is the
    variant V; --base-teacher is B, and a --recipe names the base pair (its
    teacher is B; its student, alignment and ids are used). Every tensor is
    computed in float32 in that order and rounded to the student's dtype,
    streamed chunk by chunk like a --dtype cast. The output is sealed like
    a build, with a model card (base_model: V, S and B, a merge) unless
    --no-card, carries student_config.json and the variant's tokenizer, and
    `build --teacher V --student OUT` then makes every size of the variant.

    The cosine similarity between V - B and S - init(B) (in layersplice.json;
    --report prints it per layer) tells how far the transfer can be trusted:
    the paper measured 0.73 for Qwen3-4B-Instruct-2507, 0.30 for
    Llama-3.1-8B-Instruct.

    \b
    Examples:
      layersplice transfer --base-teacher Qwen/Qwen3-4B-Base --teacher Qwen/Qwen3-4B-Instruct-2507 \\
          --student Harvard-DCML/boomerang-qwen3-2.3B --out qwen3-instruct-student --report
      layersplice build --teacher Qwen/Qwen3-4B-Instruct-2507 --student qwen3-instruct-student --all --out sizes/
      layersplice transfer --recipe recipes/tiny.yaml --teacher VARIANT --out variant-student
        (VARIANT: fixtures/tiny-teacher after your own fine-tuning, from the root of a clone)
    """
    references = {BASE: base_teacher, VARIANT: teacher, STUDENT: student}
    revisions = {BASE: base_teacher_revision, VARIANT: teacher_revision, STUDENT: student_revision}
    hub_ids = {BASE: base_teacher_id, VARIANT: teacher_id, STUDENT: student_id}
    specs = alignment_specs(copied_teacher_layers, first, every, last)
    if recipe is not None:
        parsed, root = load_recipe(recipe)
        references[BASE] = base_teacher or model_reference(parsed.teacher, root)
        references[STUDENT] = student or model_reference(parsed.student, root)
        revisions[BASE] = base_teacher_revision or parsed.teacher_revision
        revisions[STUDENT] = student_revision or parsed.student_revision
        hub_ids[BASE] = base_teacher_id or parsed.teacher_id
        hub_ids[STUDENT] = student_id or parsed.student_id
        specs.append(parsed.alignment.spec(f"recipe {recipe}"))
        shard_size = shard_size or parsed.shard_size
        hub_owner = hub_owner or parsed.hub_owner
    if references[BASE] is None or references[STUDENT] is None:
        raise LayerspliceError("name the base pair: --base-teacher B --student S, or --recipe recipes/NAME.yaml")
    planned = open_transfer(references, revisions, specs, arch_file, allow_pickle, override_alignment, hub_ids)
    for note in planned.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)

    from layersplice.output.transfer import write_transfer

    with display.progress_bar() as progress:
        task = progress.add_task(f"writing {out}", total=planned.nbytes)
        result = write_transfer(planned, out, parse_bytes(shard_size or "5GB"), force,
                                lambda n: progress.advance(task, n), card=not no_card, hub_owner=hub_owner)
    summary = {
        "out": str(out),
        "sources": planned.describe_sources(),
        "copied_teacher_layers": list(planned.alignment.copied),
        "parameters": result.params,
        "bytes": sum(f["size"] for f in result.files.values()),
        "delta_similarity": result.similarity,
    }
    if as_json:
        display.echo_json(summary)
        return
    console.print(
        f"wrote {out}: {format_params(result.params)} parameters, {format_bytes(summary['bytes'])}; "
        f"cosine(V - B, S - init(B)) = {_cosine(result.similarity['total'])}",
        highlight=False,
    )
    if report:
        _similarity_table(result.similarity)


def _cosine(value: float | None) -> str:
    return "n/a (no change)" if value is None else f"{value:.4f}"


def _similarity_table(similarity: dict) -> None:
    table = Table(title="cosine similarity of the variant's change and the distilled change")
    for column in ("part", "teacher layer", "cosine"):
        table.add_column(column, justify="left" if column == "part" else "right")
    table.add_row("embeddings", "", _cosine(similarity["embeddings"]))
    for row in similarity["layers"]:
        table.add_row(f"layer {row['layer']}", str(row["teacher_layer"]), _cosine(row["cosine"]))
    table.add_row("final norm + head", "", _cosine(similarity["head"]))
    table.add_row("total", "", _cosine(similarity["total"]), style="bold")
    console.print(table)
