"""Rank 0's account of a run: progress on stderr and --out/metrics.jsonl.

On a terminal the progress is a rich bar, redrawn in place. Anywhere else (a
CI log, a file, a pipe) a bar cannot be redrawn and would be cut to the
console's width, so the progress is whole lines instead: one every
1/LINES of the run, and the first and the last step.
"""

from __future__ import annotations

import datetime
import json
import time
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

from layersplice.checkpoint.strict_json import finite

METRICS_NAME = "metrics.jsonl"
LINES = 50  # progress lines of a whole run when stderr is not a terminal


def notice(message: str, enabled: bool) -> None:
    """One line to the user on stderr (from rank 0 only: pass world.is_main)."""
    if enabled:
        Console(stderr=True, highlight=False).print(message, markup=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class RunLog:
    """One JSON line per optimizer step (and per evaluation), mirrored on a progress bar or in lines."""

    def __init__(self, out: Path, steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / METRICS_NAME
        self.steps = steps
        self.start_step = start_step
        self.console = Console(stderr=True, highlight=False)
        self.bar = self.console.is_interactive
        self.every = max(1, steps // LINES)
        self.started = time.perf_counter()
        self.progress = Progress(
            TextColumn("distill"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[terms]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not (enabled and self.bar),
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
            f.write(json.dumps(finite(values), sort_keys=True, allow_nan=False) + "\n")
        if "loss" in values:
            terms = (
                f"loss {values['loss']:.4f} ce {values['ce']:.4f} kl {values['kl']:.4f} "
                f"cos {values['cos']:.4f} {values['tokens_per_s']:,.0f} tok/s "
                f"{values['tflops_per_device']:.3g} TFLOP/s"
            )
            if "mfu" in values:
                terms += f" MFU {values['mfu']:.1%}"
            if self.bar:
                self.progress.update(self.task, completed=values["step"], terms=terms, refresh=True)
            else:
                self._line(values["step"], terms)
        else:
            self.console.print(
                f"step {values['step']}: val loss {values['val_loss']:.4f} ce {values['val_ce']:.4f}", soft_wrap=True
            )

    def _line(self, step: int, terms: str) -> None:
        """One whole progress line, for a stderr that is not a terminal."""
        done = step - self.start_step
        if not (done == 1 or step % self.every == 0 or step == self.steps):
            return
        elapsed = time.perf_counter() - self.started
        remaining = elapsed / done * (self.steps - step)
        self.console.print(f"distill step {step}/{self.steps} {terms} elapsed {_clock(elapsed)} "
                           f"eta {_clock(remaining)}", markup=False, soft_wrap=True)
