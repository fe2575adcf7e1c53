"""The patch order the commands use: last, first, a recorded order, KL on calibration text, or search.

`resolve_order` turns the order options into the order the block functions take and its record for
layersplice.json, printing what --order kl or search chose; `read_order_file` reads a recorded one back.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from layersplice.checkpoint.bounded import CONFIG_LIMIT, read_bounded
from layersplice.errors import LayerspliceError
from layersplice.planning.blocks import BEAM, SEARCH_BUDGET, Order, SizeChoices, check_choices, patch_order
from layersplice.planning.job import Job

err_console = Console(stderr=True)


def resolve_order(job: Job, order: str, order_file: Path | None, calib: Path | None,
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

        with err_console.status("--order search: scoring sets of blocks by KL to the teacher") as status:
            def progress(scored: int, under_way: int, round_done: float, work: float) -> None:
                status.update(f"--order search: {scored:,} sets scored, {under_way:,} under way ({round_done:.0%}), "
                              f"{work:,.0f} layer-forwards")

            found = search_order_for(job, calib, *search, on_progress=progress)
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
