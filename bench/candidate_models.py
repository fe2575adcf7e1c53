"""What building a candidate model costs a search, with and without shared decoder layers.

A search builds one transformers model per set of blocks it scores. This
times, in one run and on one thread, each kind of model: whole
(`LoadedPair.model(plan)`, the baseline) and with decoder layers shared
between models of the same config, position and tensors (`shared=True`, what
SpliceRunner uses):

1. on the fixture pair (9 blocks, 512 sets), building the model of every set;
2. on the fixture pair, the whole exact `--order search` on the demo's
   calibration text (4,096 tokens in windows of 128);
3. on a random 36-layer Llama teacher (hidden 16, synthetic.py) and its 1/2/2
   student of 19 blocks, the shape of the tests' 19-block pair, the beam
   `--order search` on 4 windows of 32 random tokens: small models, so
   building them is most of the work.

    python bench/candidate_models.py [--repeat 3]    # about 5 minutes

Figures are the best of --repeat runs; ratios are against the baseline of the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from layersplice.distill.data import pack_padded
from layersplice.evaluation.candidates import SpliceRunner
from layersplice.evaluation.in_memory import LoadedPair
from layersplice.evaluation.perplexity import EvalText, load_text, load_tokenizer
from layersplice.evaluation.search_order import search_order
from layersplice.evaluation.stdlib_text import CALIBRATION_MODULES, write_documents
from layersplice.planning.job import open_job
from layersplice.planning.plan import make_plan

from synthetic import LlamaShape, write_pair

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def best_of(repeat: int, run) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def timed_search(job, text: EvalText, shared: bool) -> None:
    """--order search with whole or shared models (SpliceRunner.model otherwise unchanged)."""
    whole = SpliceRunner.model

    def model(self, patched):
        plan = make_plan(self.loaded.job.pair, patched, self.loaded.job.cast)
        return self.loaded.model(plan, shared=False), plan

    with mock.patch.object(SpliceRunner, "model", whole if shared else model):
        search_order(LoadedPair(job, torch.device("cpu"), torch.float32), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    job = open_job(str(FIXTURES / "tiny-teacher"), str(FIXTURES / "tiny-student"), [])
    n = job.pair.alignment.n_student
    sets = [frozenset(b for b in range(n) if bits >> b & 1) for bits in range(1 << n)]
    plans = [make_plan(job.pair, s) for s in sets]

    def build_all(shared: bool) -> None:
        loaded = LoadedPair(job, torch.device("cpu"), torch.float32)
        models = [loaded.model(plan, shared=shared) for plan in plans]
        assert len(models) == len(plans)

    with tempfile.TemporaryDirectory() as tmp:
        calibration = load_text(write_documents(Path(tmp) / "calibration.jsonl", CALIBRATION_MODULES),
                                load_tokenizer(job.teacher.directory), 128, 4096)
        shape = LlamaShape(layers=36, hidden=16, intermediate=32, heads=4, kv_heads=2, vocab=128)
        teacher, student = write_pair(Path(tmp), shape, "F32")
        deep = open_job(str(teacher), str(student), [])
        ids = torch.randint(0, 128, (128,), generator=torch.Generator().manual_seed(0)).tolist()
        random_text = EvalText(Path("random"), pack_padded(ids, 32, 0), 128, 32)
        rows = []
        runs = (("fixture: build all 512 models", build_all),
                ("fixture: exact --order search", lambda shared: timed_search(job, calibration, shared)),
                ("19 blocks: beam --order search", lambda shared: timed_search(deep, random_text, shared)))
        for name, run in runs:
            whole = best_of(args.repeat, lambda: run(False))
            shared = best_of(args.repeat, lambda: run(True))
            rows.append(f"| {name} | {whole:.2f} s | {shared:.2f} s | {shared / whole:.2f}x |")
    print("| 1 thread | whole models (baseline) | shared decoder layers | ratio |")
    print("|---|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\nper model: whole {1000 * best_of(1, lambda: build_all(False)) / len(plans):.1f} ms, "
          f"shared {1000 * best_of(1, lambda: build_all(True)) / len(plans):.1f} ms")


if __name__ == "__main__":
    main()
