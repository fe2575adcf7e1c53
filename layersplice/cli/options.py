"""Options shared by the commands, and what they resolve to.

The teacher, the student, the alignment, the dtype and the patch order
(last, first, a recorded order or search, or KL on calibration text) become
one `Sources`; the size options become the set of patched blocks.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console

from layersplice.checkpoint.atomic import refuse_overlap
from layersplice.checkpoint.bounded import CONFIG_LIMIT, read_bounded
from layersplice.errors import LayerspliceError
from layersplice.planning.alignment import AlignmentSpec, parse_layer_list
from layersplice.planning.blocks import (
    BEAM, ORDERS, SEARCH_BUDGET, Order, SizeChoices, by_blocks, by_keep, by_layers, by_patch, check_choices,
    patch_order,
)
from layersplice.planning.job import Job, open_job
from layersplice.planning.recipe import Recipe, load_recipe, model_reference
from layersplice.planning.sizes import describe_target, pick_target
from layersplice.units import parse_bytes

err_console = Console(stderr=True)
DTYPE_CHOICES = {"fp32": "F32", "float32": "F32", "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16"}


@dataclass(frozen=True)
class Sources:
    """What the shared source options resolved to."""

    job: Job
    recipe: Recipe | None
    order: Order
    shard_size: int
    order_record: dict  # how the order was chosen, for layersplice.json
    inputs: tuple[tuple[str, Path], ...]  # every path read, which no output may overlap


allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True,
    help="Read PyTorch .bin weights (torch.load with weights_only=True). Off by default: pickles can run code.",
)


def source_options(func):
    """Options naming the teacher, the student, the alignment and the dtype."""
    options = [
        click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path), help="Recipe YAML (recipes/*.yaml) naming teacher, student, alignment, order and output."),
        click.option("--teacher", help="Teacher: local directory or Hugging Face repo id."),
        click.option("--student", help="Distilled student: local directory or Hugging Face repo id."),
        click.option("--teacher-revision", help="Hub revision (branch, tag or commit) of the teacher."),
        click.option("--student-revision", help="Hub revision (branch, tag or commit) of the student."),
        click.option("--copied-teacher-layers", help="Teacher layer each student layer was copied from, e.g. 0,2,4,6. Overrides everything else."),
        click.option("--first", type=int, help="Alignment rule: leading one-layer blocks (reference default 1)."),
        click.option("--every", type=int, help="Alignment rule: teacher layers per block (reference default 2)."),
        click.option("--last", type=int, help="Alignment rule: trailing one-layer blocks (reference default 2)."),
        click.option("--order", type=click.Choice(ORDERS), help="Patch blocks from the end (last), the start (first), greedily by KL to the teacher on --calib text (kl), or, for each size, the blocks with the lowest KL (search; sizes need not be nested). Default: the recipe's, else last."),
        click.option("--calib", type=click.Path(exists=True, path_type=Path), help="Calibration text for --order kl or search (.txt, .jsonl, .parquet or a folder)."),
        click.option("--order-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Reuse the patch order or search recorded in a layersplice.json (e.g. one built with --order kl or search)."),
        click.option("--search-budget", type=click.IntRange(min=0), default=SEARCH_BUDGET, show_default=True, help="--order search scores every set of blocks of a size that has at most this many (the default covers any 9-block student); larger sizes get a beam search (0: every size)."),
        click.option("--beam", type=click.IntRange(min=1), default=BEAM, show_default=True, help="Beam width of --order search where a size has more sets than --search-budget."),
        click.option("--dtype", type=click.Choice(sorted(DTYPE_CHOICES)), help="Cast floating tensors (streams chunk by chunk). Default: copy bytes as they are."),
        click.option("--arch", "arch_file", type=click.Path(dir_okay=False, path_type=Path), help="Family description YAML for a model layersplice does not know."),
        allow_pickle_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def resolve_sources(recipe_path, teacher, student, teacher_revision, student_revision,
                    copied_teacher_layers, first, every, last, order, dtype, arch_file,
                    allow_pickle: bool = False, shard_size: str | None = None,
                    order_file: Path | None = None, calib: Path | None = None, out: Path | None = None,
                    search: tuple[int, int] = (SEARCH_BUDGET, BEAM)) -> Sources:
    """`out`, when the command names it now, is refused before the slow part (--order kl) if it overlaps an input.

    `search` is (--search-budget, --beam)."""
    recipe, base = load_recipe(recipe_path) if recipe_path else (None, Path("."))
    if recipe is None and not (teacher and student):
        raise LayerspliceError("name the models: --teacher T --student S, or --recipe recipes/NAME.yaml")
    specs = alignment_specs(copied_teacher_layers, first, every, last)
    if recipe is not None:
        specs.append(recipe.alignment.spec(f"recipe {recipe_path}"))
    cast = DTYPE_CHOICES[dtype] if dtype else (recipe.dtype if recipe else None)
    job = open_job(
        teacher or model_reference(recipe.teacher, base),
        student or model_reference(recipe.student, base),
        specs,
        cast,
        (teacher_revision or (recipe and recipe.teacher_revision), student_revision or (recipe and recipe.student_revision)),
        arch_file,
        allow_pickle,
    )
    for note in job.warnings:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    size = shard_size or (recipe.shard_size if recipe else "5GB")
    order = order or (recipe.order if recipe else "last")
    if recipe is not None and calib is None and order in ("kl", "search"):
        calib = recipe.calib_path(base)
        if calib is not None and not calib.exists():
            raise LayerspliceError(f"{recipe_path}: calib {calib} does not exist; fix the recipe's calib or pass --calib FILE")
    named = (("the recipe", recipe_path), ("the teacher", job.teacher.directory), ("the student", job.student.directory),
             ("--order-file", order_file), ("--calib", calib), ("--arch", arch_file))
    inputs = tuple((what, Path(path)) for what, path in named if path is not None)
    if out is not None:
        refuse_overlap(out, inputs)
    resolved, record = _resolve_order(job, order, order_file, calib, search)
    return Sources(job, recipe, resolved, parse_bytes(size), record, inputs)


def _resolve_order(job: Job, order: str, order_file: Path | None, calib: Path | None,
                   search: tuple[int, int]) -> tuple[Order, dict]:
    def step(count: int, block: int, kl: float) -> None:
        err_console.print(f"--order kl: patch {count} is block {block} (KL to the teacher {kl:.4f})", highlight=False)

    resolved, record = choose_order(job, order, order_file, calib, on_step=step, search=search)
    if record["order"] == "search":
        for line in search_summary(record["search"]):
            err_console.print(line, highlight=False)
    elif isinstance(resolved, tuple):
        chosen = record.get("kl_order", {}).get("chosen_from")
        how = f" (the {chosen} order scored best)" if chosen and chosen != "greedy" else ""
        err_console.print(f"patch order: blocks {','.join(map(str, resolved))}{how}", highlight=False)
        cost = record.get("kl_order", {}).get("layer_forwards")
        if cost:
            err_console.print(f"--order kl: {cost['spent']:.0f} layer-forwards over the calibration text (full "
                              f"passes of the same models would cost {cost['full_passes']:.0f})", highlight=False)
    return resolved, record


def alignment_specs(copied_teacher_layers, first, every, last) -> list[AlignmentSpec]:
    """The command line's alignment sources, highest precedence first."""
    specs = []
    if copied_teacher_layers:
        specs.append(AlignmentSpec(copied=parse_layer_list(copied_teacher_layers), origin="--copied-teacher-layers"))
    rule = (first, every, last)
    if any(v is not None for v in rule):
        if any(v is None for v in rule):
            raise LayerspliceError("--first, --every and --last go together: give all three")
        specs.append(AlignmentSpec(rule=rule, origin="--first/--every/--last"))
    return specs


def target_options(func):
    options = [
        click.option("--params", help="The size nearest this parameter count, e.g. 1.5B or 350M."),
        click.option("--max-bytes", help="The largest size whose weights fit, e.g. 3GiB or 500MB."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def choice_options(func):
    options = [
        click.option("--keep", type=int, help="Keep K student blocks; replace every other block by its teacher block."),
        click.option("--patch", type=int, help="Patch k multi-layer blocks, counted as the reference code counts them."),
        click.option("--layers", type=int, help="The model with L layers."),
        click.option("--blocks", help="Patch exactly these student blocks, e.g. 3,4,7."),
    ]
    func = target_options(func)
    for option in reversed(options):
        func = option(func)
    return func


def choose(sources: Sources, keep, patch, layers, blocks, params=None, max_bytes=None) -> tuple[frozenset[int], dict]:
    named = (("keep", keep), ("patch", patch), ("layers", layers), ("blocks", blocks), ("params", params), ("max_bytes", max_bytes))
    given = {k: v for k, v in named if v is not None}
    if len(given) != 1:
        raise LayerspliceError("choose the size with exactly one of --keep, --patch, --layers, --blocks, --params, --max-bytes (or --all)")
    alignment, order = sources.job.pair.alignment, sources.order
    if keep is not None:
        patched = by_keep(alignment, keep, order)
    elif patch is not None:
        patched = by_patch(alignment, patch, order)
    elif layers is not None:
        patched = by_layers(alignment, layers, order)
    elif blocks is not None:
        patched = by_blocks(alignment, parse_layer_list(blocks))
    else:
        patched = announce_target(sources, params, max_bytes).plan.patched
    return patched, {**given, **sources.order_record}


def announce_target(sources: Sources, params, max_bytes):
    """The size --params or --max-bytes picks, printed."""
    target = pick_target(sources.job, sources.order, params, max_bytes)
    err_console.print(describe_target(target), highlight=False)
    return target


def with_sources(func):
    """Collect the source options into one resolved Sources argument."""

    @functools.wraps(func)
    def wrapper(recipe, teacher, student, teacher_revision, student_revision, copied_teacher_layers,
                first, every, last, order, calib, order_file, search_budget, beam, dtype, arch_file, allow_pickle,
                **kwargs):
        sources = resolve_sources(recipe, teacher, student, teacher_revision, student_revision,
                                  copied_teacher_layers, first, every, last, order, dtype, arch_file,
                                  allow_pickle, kwargs.pop("shard_size", None), order_file=order_file, calib=calib,
                                  out=kwargs.get("out"), search=(search_budget, beam))
        return func(sources, **kwargs)

    return wrapper


def choose_order(job: Job, order: str, order_file: Path | None, calib: Path | None, on_step=None,
                 search: tuple[int, int] = (SEARCH_BUDGET, BEAM)) -> tuple[Order, dict]:
    """(order for the block functions, its record for layersplice.json)."""
    if order_file is not None:
        return _order_from_file(job, order_file)
    if order not in ("kl", "search"):
        if calib is not None:
            raise LayerspliceError("--calib is the calibration text of --order kl or search; add --order kl or drop --calib")
        return order, {"order": order}
    if calib is None:
        raise LayerspliceError(f"--order {order} measures KL on calibration text: add --calib FILE (.txt, .jsonl or .parquet)")
    if order == "search":
        from layersplice.evaluation.search_order import search_order_for

        with err_console.status("--order search: scoring sets of blocks by KL to the teacher"):
            found = search_order_for(job, calib, *search)
        return found.choices(), found.record()
    from layersplice.evaluation.kl_order import kl_order_for

    chosen = kl_order_for(job, calib, on_step)
    return chosen.blocks, chosen.record()


def _order_from_file(job: Job, path: Path) -> tuple[Order, dict]:
    found, search = read_order_file(path)
    if search is None:
        patch_order(job.pair.alignment, found)  # checks it names every block once
        return found, {"order": "file", "patch_order": list(found), "order_file": str(path)}
    try:
        choices = check_choices(job.pair.alignment, found)
    except LayerspliceError as exc:
        raise LayerspliceError(f"--order-file {path}: {exc}") from None
    return choices, {"order": "file", "order_file": str(path), "search": search}


def read_order_file(path: Path) -> tuple[tuple[int, ...], None] | tuple[SizeChoices, dict]:
    """A layersplice.json's 'patch_order', or its search (the choices and the record), at the top or in 'choice'."""
    try:
        data = json.loads(read_bounded(path, CONFIG_LIMIT, "--order-file", LayerspliceError))
    except json.JSONDecodeError as exc:
        raise LayerspliceError(f"--order-file {path}: cannot read JSON ({exc})") from None
    where = [data, data.get("choice") or {}] if isinstance(data, dict) else []
    search = next((d["search"] for d in where if isinstance(d, dict) and "search" in d), None)
    if search is not None:
        return _search_choices(path, search), search
    found = next((d["patch_order"] for d in where if isinstance(d, dict) and "patch_order" in d), None)
    if not isinstance(found, list) or not all(isinstance(b, int) for b in found):
        raise LayerspliceError(
            f"--order-file {path}: no 'patch_order' list of block numbers; give the layersplice.json "
            "of a model built with --order kl or search"
        )
    return tuple(found), None


def _search_choices(path: Path, search) -> SizeChoices:
    try:
        sizes = tuple((int(s["layers"]), tuple(sorted(int(b) for b in s["patched_blocks"]))) for s in search["sizes"])
    except (TypeError, KeyError, ValueError):
        raise LayerspliceError(
            f"--order-file {path}: its 'search' has no list of sizes with 'layers' and 'patched_blocks'; "
            "give the layersplice.json of a model built with --order search"
        ) from None
    return SizeChoices(sizes)


def search_summary(search: dict) -> list[str]:
    """What --order search chose at each size, and what it cost."""
    lines = []
    for size in search["sizes"]:
        greedy = "" if size.get("greedy_kl") is None else f", greedy kl {size['greedy_kl']:.4f}"
        lines.append(
            f"--order search: {size['layers']} layers patch blocks {','.join(map(str, size['patched_blocks']))} "
            f"(KL {size['kl']:.4f}{greedy}; {size['method']}, {size['scored']} of {size['subsets']} sets scored)"
        )
    cost = search.get("layer_forwards")
    if cost:
        lines.append(
            f"--order search: {cost['spent']:.0f} layer-forwards spent (full passes would cost "
            f"{cost['full_passes']:.0f}; the greedy kl order without the cache {cost['greedy_without_cache']:.0f})"
        )
    return lines
