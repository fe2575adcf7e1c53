"""Rich tables and JSON views for plan, inspect and build results."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from layersplice import __version__
from layersplice.architectures.layout import Layout
from layersplice.checkpoint.source import Checkpoint
from layersplice.checkpoint.strict_json import dumps
from layersplice.planning.alignment import read_student_config
from layersplice.errors import LayerspliceError
from layersplice.planning.blocks import Order, by_patch, describe_order, keep_sequence, multi_layer_blocks
from layersplice.planning.job import Job
from layersplice.planning.plan import PlanSize, SizeTable
from layersplice.units import format_bytes, format_params

UNTIED_MARK = "*"


def echo_json(data: dict, sort_keys: bool = True) -> None:
    """One --json document on stdout; a value that is not finite is null (never NaN, which is not JSON)."""
    click.echo(dumps(data, sort_keys=sort_keys))


def progress_bar() -> Progress:
    """Bytes written so far, on stderr, gone when done. Off where stderr is not a terminal:
    there rich can only print the bar's last state, and it left an empty line before any
    error line that followed."""
    console = Console(stderr=True)
    return Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True,
        disable=not console.is_terminal,
    )


def plan_rows(job: Job, order: Order) -> list[tuple[int, PlanSize, int | None]]:
    """(keep, size, reference --patch k giving the same blocks or None) for every keep."""
    alignment = job.pair.alignment
    patch_of: dict[frozenset[int], int] = {}
    for k in range(multi_layer_blocks(alignment) + 1):
        try:
            patch_of.setdefault(by_patch(alignment, k, order), k)
        except LayerspliceError:
            continue  # a search may have no size, or several, with k multi-layer blocks patched
    table = SizeTable(job.pair, job.cast)
    return [(keep, table.size(patched), patch_of.get(patched)) for keep, patched in keep_sequence(alignment, order)]


def plan_json(job: Job, order: Order, rows) -> dict:
    alignment = job.pair.alignment
    return {
        "layersplice_version": __version__,
        "family": job.pair.teacher.family,
        "order": describe_order(order),
        "alignment": {"copied_teacher_layers": list(alignment.copied), "teacher_layers": alignment.n_teacher, "from": job.alignment_origin},
        "blocks": [list(b) for b in alignment.blocks],
        "sizes": [
            {
                "keep": keep,
                "patch": k,
                "layers": plan.n_layers,
                "parameters": plan.params,
                "bytes": plan.nbytes,
                "teacher_blocks": list(plan.teacher_blocks),
                "embeddings_from": plan.embeddings_from,
                "head_from": plan.head_from,
                "untied_head": untied_head(job, plan),
            }
            for keep, plan, k in rows
        ],
    }


def plan_table(console: Console, job: Job, order: Order, rows) -> None:
    alignment = job.pair.alignment
    console.print(
        f"[bold]{job.pair.teacher.family}[/]: teacher {alignment.n_teacher} layers, student "
        f"{alignment.n_student} layers, order [bold]{describe_order(order)}[/], alignment from {job.alignment_origin}"
    )
    untied = [untied_head(job, plan) for _, plan, _ in rows]
    caption = (f"{UNTIED_MARK} stores its own copy of the tied LM head (embeddings and head come from different "
               "models), so it holds more parameters than its layer count suggests") if any(untied) else None
    table = Table(show_lines=False, caption=caption, caption_justify="left")
    for column in ("--keep", "--patch", "layers", "parameters", "on disk", "teacher blocks (teacher layers)"):
        table.add_column(column, justify="right" if column != "teacher blocks (teacher layers)" else "left")
    for (keep, plan, k), mark in zip(rows, untied):
        used = ", ".join(_run(alignment, first, last) for first, last in _runs(plan.teacher_blocks)) or "-"
        params = format_params(plan.params) + (UNTIED_MARK if mark else "")
        cells = (str(keep), "" if k is None else str(k), str(plan.n_layers), params, format_bytes(plan.nbytes), used)
        table.add_row(*map(Text, cells))  # plain Text: no markup parsing or highlighting of hundreds of rows
    console.print(table)


def untied_head(job: Job, plan: PlanSize) -> bool:
    """Whether this size of a family that ties its head stores an untied one (METHOD.md §4, tied embeddings)."""
    return plan.embeddings_from != plan.head_from and job.layouts[plan.embeddings_from].tied


def _runs(blocks: tuple[int, ...]) -> list[tuple[int, int]]:
    """Sorted blocks as runs of consecutive ones, so a row stays short for thousands of layers."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b - 1:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((b, b))
    return runs


def _run(alignment, first: int, last: int) -> str:
    """'3 (6-7)' for one block, '3-5 (6-10)' for a run: blocks, then teacher layers."""
    start, end = alignment.blocks[first][0], alignment.blocks[last][1]
    layers = str(start) if end - start == 1 else f"{start}-{end - 1}"
    return f"{first if first == last else f'{first}-{last}'} ({layers})"


def inspect_info(checkpoint: Checkpoint, layout: Layout) -> dict:
    dtypes = Counter(t.dtype for t in checkpoint.tensors.values())
    params = sum(t.numel for t in checkpoint.tensors.values())
    copied = read_student_config(checkpoint.directory)
    return {
        "path": str(checkpoint.directory),
        "model_type": checkpoint.config.get("model_type"),
        "family": layout.family,
        "inferred": layout.inferred,
        "per_layer_lists": list(layout.per_layer_lists),
        "layers": layout.n_layers,
        "parameters": params,
        "bytes": checkpoint.total_bytes,
        "dtypes": dict(sorted(dtypes.items())),
        "tied_embeddings": layout.tied,
        "shards": [{"file": p.name, "bytes": p.stat().st_size} for p in checkpoint.files],
        "student_alignment": list(copied) if copied is not None else None,
    }


def inspect_table(console: Console, info: dict) -> None:
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    family = info["family"] + (" — layout inferred from tensor names" if info["inferred"] else "")
    rows = [
        ("path", info["path"]),
        ("model_type", str(info["model_type"])),
        ("family", family),
        ("layers", str(info["layers"])),
        ("parameters", f"{format_params(info['parameters'])} ({info['parameters']:,})"),
        ("tensor bytes", format_bytes(info["bytes"])),
        ("dtypes", ", ".join(f"{d} × {n}" for d, n in info["dtypes"].items())),
        ("tied embeddings", "yes" if info["tied_embeddings"] else "no"),
        ("shards", ", ".join(f"{s['file']} ({format_bytes(s['bytes'])})" for s in info["shards"])),
    ]
    if info["per_layer_lists"]:
        rows.append(("per-layer config", ", ".join(info["per_layer_lists"])))
    if info["student_alignment"] is not None:
        rows.append(("student of teacher layers", ",".join(map(str, info["student_alignment"]))))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def built_json(built, where: Path) -> dict:
    """What build and init-student wrote, for --json: every output with its files and checksums."""
    manifest = where / "manifest.json"
    return {
        "layersplice_version": __version__,
        "out": str(where),
        "manifest": str(manifest) if manifest.is_file() else None,
        "outputs": [
            {
                "directory": str(item.directory),
                "layers": item.plan.n_layers,
                "parameters": item.plan.params,
                "bytes": sum(f["size"] for f in item.files.values()),
                "teacher_blocks": list(item.plan.teacher_blocks),
                "files": item.files,
            }
            for item in built
        ],
    }


def built_table(console: Console, built, where: Path) -> None:
    table = Table(title=f"wrote {where}")
    for column in ("directory", "layers", "parameters", "on disk", "teacher blocks"):
        table.add_column(column)
    for item in built:
        size = sum(f["size"] for f in item.files.values())
        blocks = ",".join(map(str, item.plan.teacher_blocks)) or "-"
        table.add_row(str(item.directory), str(item.plan.n_layers), format_params(item.plan.params), format_bytes(size), blocks)
    console.print(table)
