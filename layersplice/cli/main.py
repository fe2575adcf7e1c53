"""The command-line edge: the `layersplice` group and its entry point.

User errors are caught once, here, and printed as one line. The command
modules define their commands; this module adds them to the group, so the
imports run one way: main -> command modules -> options.
"""

from __future__ import annotations

import importlib
import signal
import traceback

import click

from layersplice import __version__
from layersplice.cli import build_commands, eval_commands, inspect_commands, transfer_commands
from layersplice.cli.options import err_console
from layersplice.errors import EXIT_INTERNAL, LayerspliceError


class LayerspliceGroup(click.Group):
    """Turns LayerspliceError into one line and exit 2; anything else is internal (exit 1).

    Commands that need torch at import time are loaded only when called, so
    that `build` and friends start fast and small, and `--help` lists them by
    the summary kept here (importing torch for it took ~1.3 s).
    """

    lazy_commands = {
        "distill": ("layersplice.distill.command:distill_command",
                    "Distill a student from its teacher (CE + KL + hidden-state cosine)."),
        "tokenize": ("layersplice.distill.tokenize_command:tokenize_command",
                     "Tokenize text once, with every core, for `distill --data OUT`."),
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
    Typical flow (recipes/ ships with a clone of the repository):
      layersplice inspect ./teacher                 what is in a checkpoint
      layersplice plan --recipe recipes/tiny.yaml   every reachable size
      layersplice build --recipe recipes/tiny.yaml --keep 2
      layersplice build --teacher T --student S --all --out sizes/
      layersplice transfer --base-teacher T --teacher T-Instruct --student S --out S-Instruct
    """


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main() -> None:
    # SIGTERM unwinds like an exception, so temporaries are cleaned up.
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="layersplice")


for _command in (
    build_commands.build, build_commands.init_student_command, build_commands.assemble_command,
    inspect_commands.plan, inspect_commands.inspect, inspect_commands.verify, inspect_commands.describe_command,
    eval_commands.eval_command, eval_commands.demo, transfer_commands.transfer,
):
    cli.add_command(_command)
