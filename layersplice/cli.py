"""The command-line edge: parse, call, print. User errors are caught once, here."""

from __future__ import annotations

import functools
import importlib
import signal
import traceback
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console

from layersplice import __version__
from layersplice.alignment import AlignmentSpec, parse_layer_list
from layersplice.blocks import ORDERS, Order, by_blocks, by_keep, by_layers, by_patch
from layersplice.errors import EXIT_INTERNAL, LayerspliceError
from layersplice.job import Job, open_job
from layersplice.order_choice import resolve_order
from layersplice.recipe import Recipe, load_recipe, model_reference
from layersplice.sizes import describe_target, pick_target
from layersplice.units import parse_bytes

err_console = Console(stderr=True)
DTYPE_CHOICES = {"fp32": "F32", "float32": "F32", "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16"}


class LayerspliceGroup(click.Group):
    """Turns LayerspliceError into one line and exit 2; anything else is internal (exit 1).

    Commands that need torch at import time are loaded only when called, so
    that `build` and friends start fast and small, and `--help` lists them by
    the summary kept here (importing torch for it took ~1.3 s).
    """

    lazy_commands = {
        "distill": ("layersplice.distill.command:distill_command",
                    "Distill a student from its teacher (CE + KL + hidden-state cosine)."),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_commands])

    def get_command(self, ctx: click.Context, name: str):
        if name in self.lazy_commands and name not in self.commands:
            if not ctx.resilient_parsing:  # listing for --help; shell completion needs the options
                return click.Command(name, help=self.lazy_commands[name][1])
            self._load(name)
        return super().get_command(ctx, name)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and args[0] in self.lazy_commands and args[0] not in self.commands:
            self._load(args[0])
        return super().resolve_command(ctx, args)

    def _load(self, name: str) -> None:
        module, _, attribute = self.lazy_commands[name][0].partition(":")
        self.add_command(getattr(importlib.import_module(module), attribute), name)

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except LayerspliceError as exc:
            if debug:
                traceback.print_exc()
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted")
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - the one place internal errors are reported
            if debug:
                traceback.print_exc()
            err_console.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                highlight=False, soft_wrap=True,
            )
            ctx.exit(EXIT_INTERNAL)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from layersplice.checkpoint.cast import native

    click.echo(f"layersplice, version {__version__}")
    click.echo(f"F32 -> BF16 casts: {'compiled' if native() else 'numpy (the compiled cast is not built or is off)'}")
    ctx.exit()


@click.group(cls=LayerspliceGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version, and whether casts run compiled, and exit.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """Build any model size between a teacher and its boomerang-distilled student.

    \b
    Typical flow:
      layersplice inspect ./teacher                 what is in a checkpoint
      layersplice plan --recipe recipes/tiny.yaml   every reachable size
      layersplice build --recipe recipes/tiny.yaml --keep 2
      layersplice build --teacher T --student S --all --out sizes/
    """


@dataclass(frozen=True)
class Sources:
    """What the shared source options resolved to."""

    job: Job
    recipe: Recipe | None
    order: Order
    shard_size: int
    order_record: dict  # how the order was chosen, for layersplice.json


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
        click.option("--order", type=click.Choice(ORDERS), help="Patch blocks from the end (last), the start (first), or greedily by KL to the teacher on --calib text (kl). Default: the recipe's, else last."),
        click.option("--calib", type=click.Path(exists=True, path_type=Path), help="Calibration text for --order kl (.txt, .jsonl, .parquet or a folder)."),
        click.option("--order-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Reuse the patch order recorded in a layersplice.json (e.g. one built with --order kl)."),
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
                    order_file: Path | None = None, calib: Path | None = None) -> Sources:
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
    resolved, record = _resolve_order(job, order or (recipe.order if recipe else "last"), order_file, calib)
    return Sources(job, recipe, resolved, parse_bytes(size), record)


def _resolve_order(job: Job, order: str, order_file: Path | None, calib: Path | None) -> tuple[Order, dict]:
    def step(count: int, block: int, kl: float) -> None:
        err_console.print(f"--order kl: patch {count} is block {block} (KL to the teacher {kl:.4f})", highlight=False)

    resolved, record = resolve_order(job, order, order_file, calib, on_step=step)
    if isinstance(resolved, tuple):
        chosen = record.get("kl_order", {}).get("chosen_from")
        how = f" (the {chosen} order scored best)" if chosen and chosen != "greedy" else ""
        err_console.print(f"patch order: blocks {','.join(map(str, resolved))}{how}", highlight=False)
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
                first, every, last, order, calib, order_file, dtype, arch_file, allow_pickle, **kwargs):
        sources = resolve_sources(recipe, teacher, student, teacher_revision, student_revision,
                                  copied_teacher_layers, first, every, last, order, dtype, arch_file,
                                  allow_pickle, kwargs.pop("shard_size", None), order_file=order_file, calib=calib)
        return func(sources, **kwargs)

    return wrapper


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main() -> None:
    # SIGTERM unwinds like an exception, so temporaries are cleaned up.
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="layersplice")


from layersplice import commands  # noqa: E402,F401 - registers the subcommands on `cli`
