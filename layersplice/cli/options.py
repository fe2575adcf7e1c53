"""Options shared by the commands, and what they resolve to.

Every option that several commands take is defined once here, so that it has
one name, type and help text everywhere (tests/test_shared_options.py compares
the options of every command). The teacher, the student, the alignment, the
dtype and the patch order (last, first, a recorded order or search, or KL on
calibration text) become one `Sources`; the size options become the set of
patched blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console

from layersplice.checkpoint.atomic import refuse_overlap
from layersplice.cli.orders import resolve_order
from layersplice.errors import LayerspliceError
from layersplice.planning.alignment import AlignmentSpec, parse_layer_list
from layersplice.planning.blocks import BEAM, ORDERS, SEARCH_BUDGET, Order, by_blocks, by_keep, by_layers, by_patch
from layersplice.planning.job import Job, open_job
from layersplice.planning.recipe import Recipe, load_recipe, model_reference
from layersplice.planning.sizes import describe_target, pick_target
from layersplice.units import parse_bytes

err_console = Console(stderr=True)
DTYPE_CHOICES = {"fp32": "F32", "float32": "F32", "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16"}
DEVICES = ("auto", "cpu", "cuda")


def with_options(*options):
    """One decorator applying `options` in the order listed (the first is shown first in --help)."""
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


# What each model option names, in every command that takes it.
MODELS = {
    "teacher": "The teacher",
    # distill trains it; every other command reads it trained
    "student": "The student (made by init-student; distilled, for every command but distill)",
    "base-teacher": "The teacher the student was distilled from (e.g. the Base model; default: the recipe's teacher)",
}


def model_options(role: str, required: bool = False) -> list:
    """--ROLE, --ROLE-revision and --ROLE-id: one model a command reads, by path or Hub id."""
    flag, named, what = f"--{role}", role.replace("-", " "), MODELS[role]
    return [
        click.option(flag, required=required, help=f"{what}: a local model directory or a Hugging Face repo id."),
        click.option(f"{flag}-revision", help=(
            f"Hub revision (branch, tag or commit) of the {named}; for a local copy named with {flag}-id, "
            "the revision it was downloaded at (default: the commit `hf download` noted in the copy).")),
        click.option(f"{flag}-id", metavar="OWNER/NAME", help=(
            f"The Hub repo a local {flag} is a copy of (e.g. from `hf download`): outputs name it instead of "
            "the local path (model cards as their base_model and in their commands).")),
    ]


recipe_option = click.option(
    "--recipe", type=click.Path(dir_okay=False, path_type=Path),
    help="Recipe YAML naming the teacher, student, alignment, order and output (the repository's recipes/*.yaml); "
         "options on the command line win over it.",
)
alignment_options = with_options(
    click.option("--copied-teacher-layers", help=(
        "Alignment: the teacher layer each student layer was copied from, e.g. 0,2,4,5. "
        "Wins over --first/--every/--last and the recipe.")),
    click.option("--first", type=int, help=(
        "Alignment rule, with --every and --last: blocks of --every teacher layers start at teacher layer "
        "FIRST-1, so the FIRST-1 layers before them stay one-layer blocks (the reference's 1: the first "
        "block is layers 0 to every-1).")),
    click.option("--every", type=int, help=(
        "Alignment rule: teacher layers in each multi-layer block; the student keeps the first of them "
        "(the reference's 2).")),
    click.option("--last", type=int, help=(
        "Alignment rule: blocks end at or before teacher layer N-LAST, so at least the last LAST teacher "
        "layers stay one-layer blocks (the reference's 2).")),
)
override_alignment_option = click.option(
    "--override-alignment", is_flag=True,
    help="Use the alignment of the options or recipe even where it contradicts the student's own "
         "student_config.json (without it that is refused: the splice would pair the wrong layers).",
)
dtype_option = click.option(
    "--dtype", type=click.Choice(sorted(DTYPE_CHOICES)),
    help="Floating-point dtype: outputs are cast chunk by chunk as they are written, and eval runs the sizes in "
         "it. Default: as stored (eval: fp32 on a CPU).",
)
arch_option = click.option(
    "--arch", "arch_file", type=click.Path(dir_okay=False, path_type=Path),
    help="Family description YAML for a model layersplice does not know (`layersplice describe` drafts one).",
)
allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True,
    help="Read PyTorch .bin weights (torch.load with weights_only=True). Off by default: pickles can run code.",
)
shard_size_option = click.option("--shard-size", help="Largest shard, e.g. 5GB (default), 500MB, 2GiB.")
force_option = click.option("--force", is_flag=True, help="Replace an existing layersplice output at --out.")
no_card_option = click.option("--no-card", is_flag=True, help="Leave out the model card (README.md) written into every output.")
json_option = click.option(
    "--json", "as_json", is_flag=True,
    help="Print one JSON document on stdout (what was done, paths, figures); tables and messages go to stderr.",
)
name_option = click.option(
    "--name",
    help="Name of the family: sizes are NAME-<layers>L, and titles and eval's default --out use it. Default: the "
         "recipe's name, else the student's Hub name (--student-id), else the student's folder name.",
)
hub_owner_option = click.option(
    "--hub-owner", metavar="OWNER",
    help="Hub user or organization the outputs will be uploaded to: their cards load them as OWNER/<folder name> "
         "(with --recipe, its hub_owner by default).",
)
revision_option = click.option("--revision", help="Hub revision (branch, tag or commit) when PATH is a repo id.")
device_option = click.option(
    "--device", type=click.Choice(DEVICES), default="auto", show_default=True,
    help="Where the models run: auto (the GPU if torch sees one), cpu or cuda (under torchrun: each process's "
         "own GPU).",
)
text_field_option = click.option(
    "--text-field", default="text", show_default=True, help="Field or column that holds the text.",
)
# Where distill and tokenize read their text from (beside each one's own --data).
data_source_options = with_options(
    click.option("--dataset", help="A dataset streamed by datasets.load_dataset: hub name or local folder."),
    click.option("--dataset-config", help="The dataset's configuration name, if it has several."),
    click.option("--split", default="train", show_default=True,
                 help="The split of --dataset (or of a saved dataset given to --data) to read; the validation "
                      "documents are held out of it."),
    text_field_option,
)


def holdout_options(default_val_tokens: int):
    """--val-tokens and --val-fraction, the validation split of distill's and tokenize's text.

    The default is the caller's (distill/config.py, which imports torch; this module must not)."""
    return with_options(
        click.option("--val-tokens", type=int, help=(
            f"Hold out the first documents, up to this many tokens, for validation [default: {default_val_tokens}].")),
        click.option("--val-fraction", type=float,
                     help="Hold out this fraction of the documents instead (local data only)."),
    )


@dataclass(frozen=True)
class SourceRequest:
    """The source options as given (None: not given)."""

    recipe: Path | None = None
    teacher: str | None = None
    teacher_revision: str | None = None
    teacher_id: str | None = None
    student: str | None = None
    student_revision: str | None = None
    student_id: str | None = None
    copied_teacher_layers: str | None = None
    first: int | None = None
    every: int | None = None
    last: int | None = None
    override_alignment: bool = False
    order: str | None = None
    calib: Path | None = None
    order_file: Path | None = None
    search_budget: int = SEARCH_BUDGET
    beam: int = BEAM
    dtype: str | None = None
    arch_file: Path | None = None
    allow_pickle: bool = False
    recorded_alignment: AlignmentSpec | None = None  # a family's own record (eval --models), below the options

    @classmethod
    def pop_from(cls, kwargs: dict) -> "SourceRequest":
        return cls(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs})


@dataclass(frozen=True)
class Sources:
    """What the shared source options resolved to."""

    job: Job
    recipe: Recipe | None
    order: Order
    shard_size: int
    order_record: dict  # how the order was chosen, for layersplice.json
    inputs: tuple[tuple[str, Path], ...]  # every path read, which no output may overlap


source_options = with_options(
    recipe_option,
    *model_options("teacher"),
    *model_options("student"),
    alignment_options,
    override_alignment_option,
    click.option("--order", type=click.Choice(ORDERS), help="Patch blocks from the end (last), the start (first), greedily by KL to the teacher on --calib text (kl), or, for each size, the blocks with the lowest KL (search; sizes need not be nested). Default: the recipe's, else last."),
    click.option("--calib", type=click.Path(exists=True, path_type=Path), help="Calibration text for --order kl or search (.txt, .jsonl, .parquet or a folder; default: the recipe's calib)."),
    click.option("--order-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Reuse the patch order or search recorded in a layersplice.json (e.g. one built with --order kl or search)."),
    click.option("--search-budget", type=click.IntRange(min=0), default=SEARCH_BUDGET, show_default=True, help="--order search scores every set of blocks of a size that has at most this many (the default covers any 9-block student); larger sizes get a beam search (0: every size)."),
    click.option("--beam", type=click.IntRange(min=1), default=BEAM, show_default=True, help="Beam width of --order search where a size has more sets than --search-budget."),
    dtype_option,
    arch_option,
    allow_pickle_option,
)


def resolve_sources(request: SourceRequest, shard_size: str | None = None, out: Path | None = None) -> Sources:
    """`out`, when the command names it now, is refused before the slow part (--order kl or search) if it
    overlaps an input."""
    recipe, base = load_recipe(request.recipe) if request.recipe else (None, Path("."))
    if recipe is None and not (request.teacher and request.student):
        raise LayerspliceError("name the models: --teacher T --student S, or --recipe recipes/NAME.yaml")
    specs = alignment_specs(request.copied_teacher_layers, request.first, request.every, request.last)
    if request.recorded_alignment is not None:
        specs.append(request.recorded_alignment)
    if recipe is not None:
        specs.append(recipe.alignment.spec(f"recipe {request.recipe}"))
    cast = DTYPE_CHOICES[request.dtype] if request.dtype else (recipe.dtype if recipe else None)
    job = open_job(
        request.teacher or model_reference(recipe.teacher, base),
        request.student or model_reference(recipe.student, base),
        specs,
        cast,
        (request.teacher_revision or (recipe and recipe.teacher_revision),
         request.student_revision or (recipe and recipe.student_revision)),
        request.arch_file,
        request.allow_pickle,
        request.override_alignment,
        (request.teacher_id or (recipe and recipe.teacher_id), request.student_id or (recipe and recipe.student_id)),
    )
    if recipe is not None:
        job = dataclasses.replace(job, hub_owner=recipe.hub_owner)
    for note in job.warnings:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    size = shard_size or (recipe.shard_size if recipe else "5GB")
    order = request.order or (recipe.order if recipe else "last")
    calib = request.calib
    if recipe is not None and calib is None and order in ("kl", "search"):
        calib = recipe.calib_path(base)
        if calib is not None and not calib.exists():
            raise LayerspliceError(
                f"{request.recipe}: calib {calib} does not exist; fix the recipe's calib or pass --calib FILE")
    named = (("the recipe", request.recipe), ("the teacher", job.teacher.directory), ("the student", job.student.directory),
             ("--order-file", request.order_file), ("--calib", calib), ("--arch", request.arch_file))
    inputs = tuple((what, Path(path)) for what, path in named if path is not None)
    if out is not None:
        refuse_overlap(out, inputs)
    resolved, record = resolve_order(job, order, request.order_file, calib, (request.search_budget, request.beam))
    return Sources(job, recipe, resolved, parse_bytes(size), record, inputs)


def family_name(sources: Sources, name: str | None) -> str:
    """--name, else the recipe's, else the student's Hub name, else the student's folder name.

    Never the teacher's folder: a family is the student's, and `./teacher` would name every size 'teacher-NL'."""
    if name:
        return name
    if sources.recipe is not None:
        return sources.recipe.name
    student = sources.job.student
    return student.hub_name.split("/")[-1] if student.hub_name else Path(student.reference).expanduser().resolve().name


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


target_options = with_options(
    click.option("--params", help="The size nearest this parameter count, e.g. 1.5B or 350M."),
    click.option("--max-bytes", help="The largest size whose weights fit, e.g. 3GiB or 500MB."),
)
choice_options = with_options(
    click.option("--keep", type=int, help="Keep K student blocks; replace every other block by its teacher block."),
    click.option("--patch", type=int, help="Patch k multi-layer blocks, counted as the reference code counts them."),
    click.option("--layers", type=int, help="The model with L layers."),
    click.option("--blocks", help="Patch exactly these student blocks, e.g. 3,4,7."),
    target_options,
)


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
    """The size --params or --max-bytes picks, printed (with a warning when --params lies outside the family)."""
    target = pick_target(sources.job, sources.order, params, max_bytes)
    if target.warning:
        err_console.print(f"[yellow]warning:[/] {target.warning}", highlight=False)
    err_console.print(describe_target(target), highlight=False)
    return target


def with_sources(func):
    """Collect the source options into one resolved Sources argument."""

    @functools.wraps(func)
    def wrapper(**kwargs):
        request = SourceRequest.pop_from(kwargs)
        sources = resolve_sources(request, kwargs.pop("shard_size", None), out=kwargs.get("out"))
        return func(sources, **kwargs)

    return wrapper
