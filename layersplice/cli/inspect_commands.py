"""plan, inspect, verify and describe: the commands that read and report."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from layersplice.architectures.draft import draft_text
from layersplice.checkpoint.atomic import refuse_overlap
from layersplice.cli import display
from layersplice.cli.options import (
    Sources,
    allow_pickle_option,
    announce_target,
    arch_option,
    json_option,
    revision_option,
    source_options,
    target_options,
    with_sources,
)
from layersplice.errors import LayerspliceError
from layersplice.output.verify import verify_path
from layersplice.planning.job import single_layout
from layersplice.units import format_bytes

console = Console()


@click.command()
@source_options
@target_options
@json_option
@with_sources
def plan(sources: Sources, params, max_bytes, as_json: bool) -> None:
    """Show every reachable size before writing anything.

    One row per --keep value from the student down to the teacher: layers,
    parameters, bytes on disk and the teacher blocks used. A size whose
    embeddings and head come from different models stores its own copy of a
    tied head, marked * (untied_head in --json).

    With --params or --max-bytes it also names the one size that request picks.

    \b
    Examples (from the root of a clone: recipes/ ships with the repository):
      layersplice plan --recipe recipes/tiny.yaml
      layersplice plan --recipe recipes/qwen3.yaml --max-bytes 6GiB
    """
    job = sources.job
    rows = display.plan_rows(job, sources.order)
    target = announce_target(sources, params, max_bytes) if params or max_bytes else None
    if as_json:
        data = {**display.plan_json(job, sources.order, rows), **sources.order_record}
        if target is not None:
            data["chosen"] = {"keep": target.keep, "layers": target.plan.n_layers, "parameters": target.plan.params,
                              "bytes": target.plan.nbytes, "reason": target.reason}
        display.echo_json(data, sort_keys=False)
    else:
        display.plan_table(console, job, sources.order, rows)


@click.command()
@click.argument("path")
@revision_option
@arch_option
@json_option
@allow_pickle_option
def inspect(path: str, revision, arch_file, as_json: bool, allow_pickle: bool) -> None:
    """Show a checkpoint: family, layers, parameters, dtypes, shards, alignment.

    PATH is a local model directory or a Hugging Face repo id.
    """
    checkpoint, layout = single_layout(path, revision, arch_file, allow_pickle)
    info = display.inspect_info(checkpoint, layout)
    if as_json:
        display.echo_json(info, sort_keys=False)
    else:
        display.inspect_table(console, info)



@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--against-sources", is_flag=True, help="Also compare every tensor with the teacher or student bytes it came from.")
@click.option("--allow-extra", "allow_extra", multiple=True, metavar="FILE",
              help="Accept this unlisted file, given relative to PATH (README.md, or m-4L/NOTES.md inside one "
                   "size of a --all directory). Repeat for each file.")
@json_option
def verify(path: Path, against_sources: bool, allow_extra: tuple[str, ...], as_json: bool) -> None:
    """Check an output's integrity; exit 0 only if every check passes.

    Re-reads PATH (a build output, a `build --all` directory or a `tokenize`
    output, whose token ids must also lie inside its vocabulary): the sealed
    layersplice.json / manifest.json, the checksum of every file, every
    safetensors header, the index, and the config against the tensors. A
    single flipped byte anywhere fails, and so does any file or folder the
    records do not list (a stray model.safetensors would be loaded in place
    of the shards), unless --allow-extra names it. For a family, every size
    its parts record (OUT/parts/) must be in manifest.json. The first problem
    is named and the exit code is 2. --json prints ok, the models, files and
    bytes checked, or the problem.

    \b
    Examples (out/tiny-12L as `build --recipe recipes/tiny.yaml --layers 12` writes it):
      layersplice verify out/tiny-12L
      layersplice verify sizes/ --against-sources
      layersplice verify sizes/ --json
      layersplice verify out/tiny-12L --allow-extra NOTES.md
      layersplice verify sizes/ --allow-extra NOTES.md --allow-extra tiny-4L/NOTES.md
    """
    try:
        result = verify_path(path, against_sources, allow_extra)
    except LayerspliceError as exc:
        if as_json:  # CI parses stdout; the one-line error and exit 2 still follow
            display.echo_json({"ok": False, "path": str(path), "problem": str(exc)}, sort_keys=False)
        raise
    if as_json:
        display.echo_json({
            "ok": True, "path": str(path), "against_sources": against_sources,
            "directories": [str(d) for d in result.directories], "files": result.files, "bytes": result.bytes,
        }, sort_keys=False)
        return
    console.print(
        f"[green]ok[/]: {len(result.directories)} output(s), {result.files} files, "
        f"{format_bytes(result.bytes)} verified{' against sources' if against_sources else ''}"
    )


@click.command("describe")
@click.argument("path")
@revision_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the YAML to this file instead of printing it.")
def describe_command(path: str, revision: str | None, out: Path | None) -> None:
    """Print a family description (YAML) for the model at PATH.

    For a family layersplice does not describe but infers from `<prefix>.<i>.`
    tensor names, this is a draft to check and pass with --arch FILE. For a
    described family it prints the built-in description.

    \b
    Examples:
      layersplice describe ./my-model > my_family.yaml
      layersplice build --teacher T --student S --arch my_family.yaml --keep 4 --out mid
    """
    checkpoint, layout = single_layout(path, revision)
    text = draft_text(checkpoint, layout)
    if out is None:
        click.echo(text, nl=False)
    else:
        refuse_overlap(out, [("the model", checkpoint.directory)])
        out.write_text(text)
        click.echo(f"wrote {out}")
