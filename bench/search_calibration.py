"""Does any sample of the fixture's calibration text make --order search no worse than greedy kl at every size?

On the fixture pair (9 blocks, 512 sets) every set's KL(teacher || splice) is
measured window by window on the whole calibration text (the docstrings of
stdlib_text.CALIBRATION_MODULES, about 21,400 tokens) and its perplexity on
the held-out text (16,384 tokens of stdlib_text.HELD_OUT_MODULES), in windows
of 128. Then, for several samples of the calibration windows (the first N, as
the demo and `--order kl` read them; N spread evenly over the whole file; all
of them), it replays what greedy kl and the exact search choose from those
windows alone and reports the search's held-out gain at each size.

For each size it also gives the t statistic of the search's KL advantage over
greedy's set with documents as clusters (the paired difference summed per
calibration module; standard error over modules), so a choice that holds in
only some modules shows as a small t.

Last, as a diagnosis only, the choice that KL measured on the held-out text
itself would make: it tells a calibration text that ranks blocks unlike the
held-out one (a difference of texts) from KL that ranks them unlike
perplexity (a difference of measures). Nothing here chooses on held-out text
for the product.

    python bench/search_calibration.py [--json study.json]   # about 10 minutes on 1 thread
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
from pathlib import Path

import torch

from layersplice.evaluation.candidates import SpliceRunner
from layersplice.evaluation.in_memory import LoadedPair
from layersplice.evaluation.kl_order import Target
from layersplice.evaluation.perplexity import EvalText, load_text, load_tokenizer
from layersplice.evaluation.stdlib_text import (
    CALIBRATION_MODULES, HELD_OUT_MODULES, module_docstrings, write_documents,
)
from layersplice.planning.blocks import size_of
from layersplice.planning.job import open_job

from search_orders import FIXTURES, HELD_OUT_TOKENS, SEQ_LEN, held_out_perplexity

BATCH = 8


def window_kl(loaded: LoadedPair, text: EvalText, sets: list[frozenset[int]]) -> dict[frozenset[int], list[float]]:
    """KL(teacher || splice) summed over each window's real tokens, for every set."""
    runner = SpliceRunner(loaded, text, BATCH)
    teacher = runner.model(frozenset(range(loaded.job.pair.alignment.n_student)))
    target: list[Target] = []
    sums: dict[frozenset[int], list[float]] = {s: [] for s in sets}

    def before(index: int, ids: torch.Tensor, mask: torch.Tensor) -> None:
        target[:] = [Target.of(runner.logits(*teacher, index, ids, mask), mask)]

    def add(patched: frozenset[int], index: int, logits: torch.Tensor, mask: torch.Tensor) -> None:
        sums[patched].extend(target[0].kl_per_token(logits).sum(-1).tolist())

    runner.run(sets, add, before)
    return sums


def window_documents(text: EvalText, tokenizer, modules: tuple[str, ...]) -> list[int]:
    """The module each window mostly falls in (documents are joined by EOS, as load_text packs them)."""
    ends = list(itertools.accumulate(len(tokenizer(module_docstrings(m))["input_ids"]) + 1 for m in modules))
    middles = [w * text.seq_len + text.seq_len // 2 for w in range(len(text.windows.ids))]
    return [next((d for d, end in enumerate(ends) if middle < end), len(ends) - 1) for middle in middles]


class Replay:
    """Greedy kl and the exact search as they would choose from a subset of the calibration windows."""

    def __init__(self, alignment, kl: dict, tokens: list[int], documents: list[int], windows: list[int]) -> None:
        self.alignment, self.kl, self.tokens, self.documents, self.windows = alignment, kl, tokens, documents, windows
        self.total = sum(tokens[w] for w in windows)

    def mean(self, s: frozenset[int]) -> float:
        return sum(self.kl[s][w] for w in self.windows) / self.total

    def greedy(self) -> list[int]:
        order: list[int] = []
        n = self.alignment.n_student
        while len(order) < n:
            left = [b for b in range(n) if b not in order]
            order.append(min(left, key=lambda b: (self.mean(frozenset(order) | {b}), b)))
        return order

    def cluster_t(self, greedy: frozenset[int], best: frozenset[int]) -> float:
        """The search's mean KL advantage over greedy's set in standard errors, modules as clusters."""
        difference = self.mean(greedy) - self.mean(best)
        per_document: dict[int, float] = {}
        for w in self.windows:
            residual = self.kl[greedy][w] - self.kl[best][w] - self.tokens[w] * difference
            per_document[self.documents[w]] = per_document.get(self.documents[w], 0.0) + residual
        g = len(per_document)
        if g < 2 or difference == 0:
            return float("nan")
        error = math.sqrt(g / (g - 1) * sum(r * r for r in per_document.values())) / self.total
        return difference / error if error else float("inf")


def study(kl: dict, tokens: list[int], documents: list[int], perplexity: dict, alignment,
          samples: dict[str, list[int]]) -> list[dict]:
    sizes = list(range(alignment.n_student + 1, alignment.n_teacher))
    rows = []
    for name, windows in samples.items():
        replay = Replay(alignment, kl, tokens, documents, windows)
        order = replay.greedy()
        gains, ts, chosen = [], [], []
        for n in sizes:
            greedy = next(frozenset(order[:k]) for k in range(len(order), -1, -1)
                          if size_of(alignment, frozenset(order[:k])) == n)
            best = min((s for s in kl if size_of(alignment, s) == n), key=lambda s: (replay.mean(s), sorted(s)))
            gains.append(100 * (perplexity[greedy] - perplexity[best]) / perplexity[greedy])
            ts.append(replay.cluster_t(greedy, best) if best != greedy else float("nan"))
            chosen.append(sorted(best))
        rows.append({"sample": name, "windows": len(windows), "modules": len({documents[w] for w in windows}),
                     "greedy_order": order, "sizes": sizes, "gains": gains, "cluster_t": ts, "search": chosen})
    return rows


def table(rows: list[dict]) -> list[str]:
    sizes = rows[0]["sizes"]
    lines = ["| calibration windows (modules) | greedy order | " + " | ".join(f"{n}" for n in sizes)
             + " | mean | worse at |", "|---|---|" + "---:|" * len(sizes) + "---:|---|"]
    for row in rows:
        cells = [f"{g:+.2f} %" + ("" if math.isnan(t) else f" (t {t:.1f})")
                 for g, t in zip(row["gains"], row["cluster_t"])]
        worse = [str(n) for n, g in zip(sizes, row["gains"]) if g < 0]
        lines.append(f"| {row['sample']} ({row['modules']}) | {','.join(map(str, row['greedy_order']))} | "
                     + " | ".join(cells) + f" | {sum(row['gains']) / len(sizes):+.2f} % | {', '.join(worse) or '-'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    job = open_job(str(FIXTURES / "tiny-teacher"), str(FIXTURES / "tiny-student"), [])
    alignment = job.pair.alignment
    tokenizer = load_tokenizer(job.teacher.directory)
    loaded = LoadedPair(job, torch.device("cpu"), torch.float32)
    every = [frozenset(b for b in range(alignment.n_student) if bits >> b & 1) for bits in range(1 << alignment.n_student)]
    with tempfile.TemporaryDirectory() as tmp:
        calibration = load_text(write_documents(Path(tmp) / "calibration.jsonl", CALIBRATION_MODULES), tokenizer,
                                SEQ_LEN, None)
        held_out = load_text(write_documents(Path(tmp) / "held-out.jsonl", HELD_OUT_MODULES), tokenizer, SEQ_LEN,
                             HELD_OUT_TOKENS)
    kl = window_kl(loaded, calibration, every)
    held_out_kl = window_kl(loaded, held_out, every)
    perplexity = held_out_perplexity(loaded, held_out, every)
    tokens = calibration.windows.mask.sum(-1).tolist()
    documents = window_documents(calibration, tokenizer, CALIBRATION_MODULES)
    count = len(tokens)
    samples = {"all": list(range(count))}
    for first in (32, 64, 128):
        samples[f"first {first}"] = list(range(first))
        samples[f"spread {first}"] = sorted({round(i * (count - 1) / (first - 1)) for i in range(first)})
    rows = study(kl, tokens, documents, perplexity, alignment, samples)
    held_tokens = held_out.windows.mask.sum(-1).tolist()
    diagnosis = study(held_out_kl, held_tokens, [0] * len(held_tokens), perplexity, alignment,
                      {"held-out text (diagnosis only)": list(range(len(held_tokens)))})
    print(f"calibration: {calibration.tokens} tokens in {count} windows of {SEQ_LEN}; search gain over greedy kl "
          "in held-out perplexity per size (t: the search's KL advantage in module-clustered standard errors)\n")
    print("\n".join(table(rows + diagnosis)))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "diagnosis": diagnosis}, indent=2))


if __name__ == "__main__":
    main()
