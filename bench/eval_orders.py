"""Held-out perplexity of every size of the tiny fixture pair under the three patch
orders (last, first, kl), as a markdown table for bench/RESULTS.md.

--order kl is calibrated on the docstrings of stdlib_text.CALIBRATION_MODULES
and measured on stdlib_text.HELD_OUT_MODULES (disjoint, and neither in the
fixture pair's training text).

    python bench/eval_orders.py [--tokens 16384] [--fixtures fixtures]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from layersplice.evaluation.in_memory import LoadedPair
from layersplice.evaluation.kl_order import calibration_text, choose_kl_order
from layersplice.evaluation.perplexity import EvalRequest, evaluate_family, load_tokenizer
from layersplice.evaluation.stdlib_text import CALIBRATION_MODULES, HELD_OUT_MODULES, write_documents
from layersplice.planning.job import open_job

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens to measure")
    parser.add_argument("--fixtures", type=Path, default=FIXTURES, help="folder holding tiny-teacher and tiny-student")
    args = parser.parse_args()
    torch.set_num_threads(1)
    job = open_job(str(args.fixtures / "tiny-teacher"), str(args.fixtures / "tiny-student"), [])
    with tempfile.TemporaryDirectory() as tmp:
        calib = write_documents(Path(tmp) / "calibration.jsonl", CALIBRATION_MODULES)
        held_out = write_documents(Path(tmp) / "held-out.jsonl", HELD_OUT_MODULES)
        started = time.perf_counter()
        loaded = LoadedPair(job, torch.device("cpu"), torch.float32)
        chosen = choose_kl_order(loaded, calibration_text(job, calib, load_tokenizer(job.teacher.directory)))
        kl_seconds = time.perf_counter() - started
        request = EvalRequest(held_out, baseline=True, seq_len=128, max_tokens=args.tokens, device="cpu")
        results = {order: evaluate_family(job, blocks, request)[0]
                   for order, blocks in (("last", "last"), ("first", "first"), ("kl", chosen.blocks))}
    print(f"--order kl: patch order {list(chosen.blocks)} (chosen from {chosen.chosen_from}; greedy "
          f"{list(chosen.greedy)}), {kl_seconds:.0f} s on 1 thread")
    print("mean KL to the teacher over parameter budgets, calibration text: "
          + ", ".join(f"{name} {value:.4f}" for name, value in chosen.budget_kl.items()))
    print()
    print("| layers | parameters | last | first | kl | naive (last / first / kl) |")
    print("|---:|---:|---:|---:|---:|---:|")
    by_layers = {order: {r.layers: r for r in rows} for order, rows in results.items()}
    for layers in sorted(by_layers["last"]):
        cells = [by_layers[o][layers] for o in ("last", "first", "kl")]
        naive = " / ".join(f"{c.naive_perplexity:.2f}" for c in cells)
        print(f"| {layers} | {cells[0].parameters:,} | " + " | ".join(f"{c.perplexity:.2f}" for c in cells)
              + f" | {naive} |")


if __name__ == "__main__":
    main()
