"""Rank 0's account of a run: a rich progress bar and --out/metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

METRICS_NAME = "metrics.jsonl"


def notice(message: str, enabled: bool) -> None:
    """One line to the user on stderr (from rank 0 only: pass world.is_main)."""
    if enabled:
        Console(stderr=True, highlight=False).print(message, markup=False, soft_wrap=True)


class RunLog:
    """One JSON line per optimizer step (and per evaluation), mirrored on a progress bar."""

    def __init__(self, out: Path, steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / METRICS_NAME
        self.progress = Progress(
            TextColumn("distill"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[terms]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            disable=not enabled,
            # Redrawn once a step from the loop: a refresh thread would compete
            # with the compute threads for the cores.
            auto_refresh=False,
        )
        self.task = self.progress.add_task("distill", total=steps, completed=start_step, terms="")
        if enabled:
            out.mkdir(parents=True, exist_ok=True)
            self._keep_records_up_to(start_step)

    def _keep_records_up_to(self, step: int) -> None:
        """On resume, forget what an interrupted run logged after its last checkpoint."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def __enter__(self) -> RunLog:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def record(self, values: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(values, sort_keys=True) + "\n")
        if "loss" in values:
            terms = (
                f"loss {values['loss']:.4f} ce {values['ce']:.4f} kl {values['kl']:.4f} "
                f"cos {values['cos']:.4f} {values['tokens_per_s']:,.0f} tok/s "
                f"{values['tflops_per_device']:.3g} TFLOP/s"
            )
            if "mfu" in values:
                terms += f" MFU {values['mfu']:.1%}"
            self.progress.update(self.task, completed=values["step"], terms=terms, refresh=True)
        else:
            self.progress.console.print(
                f"step {values['step']}: val loss {values['val_loss']:.4f} ce {values['val_ce']:.4f}"
            )
