"""--order kl (greedy) against --order search, per size, on held-out text; two PNGs and markdown tables.

1. The fixture pair (fixtures/, recipes/tiny.yaml), on the demo's texts:
   calibration KL on the first 4,096 tokens of stdlib_text.CALIBRATION_MODULES
   and held-out perplexity on 16,384 tokens of stdlib_text.HELD_OUT_MODULES,
   windows of 128 (--calibration default: the calibration of `--order kl` and
   `--order search` on the command line instead, 16,384 tokens in windows of 512). Greedy kl and search (exact at every size: 9 blocks) against
   the beam alone (--search-budget 0, within greedy's uncached cost) and the
   exhaustive oracle: every one of the 512 sets of blocks measured on the
   held-out text, the best per size. Layer-forwards and wall time of each.
2. A deeper pair made like the fixture (bench/deep_pair.py: 28-layer teacher,
   15 student blocks), on the same texts: greedy kl against the beam search,
   which must stay within greedy's uncached cost.

    python bench/search_orders.py [--out bench/orders.png]   # about 20 minutes, plus deep_pair.py's first run

Held-out perplexity is never used to choose anything: it only measures.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from layersplice.distill.losses import cross_entropy_loss
from layersplice.evaluation.candidates import SpliceRunner
from layersplice.evaluation.in_memory import LoadedPair
from layersplice.evaluation.kl_order import calibration_text, choose_kl_order
from layersplice.evaluation.perplexity import EvalText, load_text, load_tokenizer, predicted, window_batches
from layersplice.evaluation.plot import Curve, plot_family
from layersplice.evaluation.search_order import search_order
from layersplice.evaluation.stdlib_text import CALIBRATION_MODULES, HELD_OUT_MODULES, write_documents
from layersplice.planning.blocks import SEARCH_BUDGET, by_layers, size_of
from layersplice.planning.job import open_job

from deep_pair import deep_pair

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SEQ_LEN = 128
CALIBRATION_TOKENS = 4096
HELD_OUT_TOKENS = 16_384
HELD_OUT_BATCH = 8


def held_out_perplexity(loaded: LoadedPair, text: EvalText, sets: list[frozenset[int]]) -> dict[frozenset[int], float]:
    """Perplexity of each splice on the held-out text, every splice run from the first block where it differs."""
    runner = SpliceRunner(loaded, text, HELD_OUT_BATCH)
    ids = [batch for batch, _ in window_batches(text, HELD_OUT_BATCH, loaded.device)]
    totals = {s: [0.0, 0] for s in sets}

    def add(patched: frozenset[int], index: int, logits: torch.Tensor, mask: torch.Tensor) -> None:
        count = predicted(mask)
        totals[patched][0] += float(cross_entropy_loss(logits, ids[index], mask)) * count
        totals[patched][1] += count

    runner.run(sets, add)
    return {s: math.exp(total / count) for s, (total, count) in totals.items()}


def compare(loaded: LoadedPair, calibration: EvalText, held_out: EvalText, oracle: bool) -> dict:
    """Greedy kl and search (and with `oracle` the beam alone and every set) on one pair: choices, costs, perplexity."""
    alignment = loaded.job.pair.alignment
    started = time.perf_counter()
    greedy = choose_kl_order(loaded, calibration)
    seconds = {"greedy": time.perf_counter() - started}
    searches = {}
    # Where the default search is exact (the fixture), also the beam alone: --search-budget 0.
    for name, budget in (("search", SEARCH_BUDGET), ("beam", 0))[: 2 if oracle else 1]:
        started = time.perf_counter()
        searches[name] = search_order(loaded, calibration, budget)
        seconds[name] = time.perf_counter() - started
    found = searches["search"]
    sizes = [s.layers for s in found.sizes]
    chosen = {"greedy": {n: by_layers(alignment, n, greedy.greedy) for n in sizes}}
    chosen.update({name: {s.layers: frozenset(s.patched) for s in run.sizes} for name, run in searches.items()})
    every = [frozenset(b for b in range(alignment.n_student) if bits >> b & 1) for bits in range(1 << alignment.n_student)]
    measured = every if oracle else list({s for sets in chosen.values() for s in sets.values()})
    started = time.perf_counter()
    perplexity = held_out_perplexity(loaded, held_out, measured + [frozenset(), frozenset(range(alignment.n_student))])
    seconds["held_out"] = time.perf_counter() - started
    if oracle:
        chosen["oracle"] = {n: min((s for s in every if size_of(alignment, s) == n), key=perplexity.get) for n in sizes}
    return {
        "sizes": sizes,
        "chosen": {name: {n: sorted(s) for n, s in sets.items()} for name, sets in chosen.items()},
        "perplexity": {name: {n: perplexity[s] for n, s in sets.items()} for name, sets in chosen.items()},
        "kl": {"greedy": {s.layers: s.greedy_kl for s in found.sizes},
               **{name: {s.layers: s.kl for s in run.sizes} for name, run in searches.items()}},
        "methods": {s.layers: f"{s.method}, {s.scored} of {s.subsets}" for s in found.sizes},
        "ends": {"student": perplexity[frozenset()], "teacher": perplexity[frozenset(range(alignment.n_student))]},
        "cost": {"greedy": greedy.layer_forwards, **{name: run.layer_forwards for name, run in searches.items()}},
        "seconds": {name: round(value, 1) for name, value in seconds.items()},
        "greedy_order": list(greedy.greedy),
    }


def table(result: dict) -> list[str]:
    names = list(result["chosen"])
    head = "| layers | " + " | ".join(f"{n} ppl (blocks)" for n in names) + " | search gain | KL greedy / search | search |"
    lines = [head, "|---:|" + "---|" * len(names) + "---:|---:|---|"]
    gains = []
    for n in result["sizes"]:
        ppl = result["perplexity"]
        gain = 100 * (ppl["greedy"][n] - ppl["search"][n]) / ppl["greedy"][n]
        gains.append(gain)
        cells = [f"{ppl[name][n]:.2f} {result['chosen'][name][n]}" for name in names]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {gain:+.2f} % | {result['kl']['greedy'][n]:.4f} / "
                     f"{result['kl']['search'][n]:.4f} | {result['methods'][n]} |")
    lines.append(f"\nmean gain of search over greedy: {sum(gains) / len(gains):+.2f} %; search better at "
                 f"{sum(g > 0 for g in gains)}, equal at {sum(g == 0 for g in gains)}, worse at "
                 f"{sum(g < 0 for g in gains)} of {len(gains)} sizes")
    cost, seconds = result["cost"], result["seconds"]
    runs = ", ".join(f"{name} {cost[name]['spent']:.0f} ({cost[name]['heads']:.0f}; {seconds[name]} s)"
                     for name in cost)
    lines.append(
        f"layer-forwards over the calibration text (head passes; wall time on 1 thread): {runs}; greedy without "
        f"the cache {cost['search']['greedy_without_cache']:.0f} ({cost['search']['greedy_heads_without_cache']:.0f}); "
        f"every model the search scored, each from its first layer: {cost['search']['full_passes']:.0f}; "
        f"held-out measurement {seconds['held_out']} s")
    return lines


def plot(path: Path, result: dict, title: str) -> None:
    sizes = result["sizes"]
    labels = {"greedy": "greedy kl", "search": "search", "beam": "beam alone (--search-budget 0)",
              "oracle": "held-out oracle (every set measured)"}
    curves = [Curve(labels[name], sizes, [result["perplexity"][name][n] for n in sizes],
                    "--" if name == "oracle" else ":" if name == "beam" else "-") for name in result["chosen"]]
    ends = result["ends"]
    plot_family(path, curves, (sizes[0] - 1, ends["student"]), (sizes[-1] + 1, ends["teacher"]),
                "perplexity (held-out text)", title, xlabel="layers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=here / "orders.png", help="the fixture's PNG")
    parser.add_argument("--deep-out", type=Path, default=here / "orders-deep.png", help="the deeper pair's PNG")
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--only", choices=("fixture", "deep"), help="measure one of the two pairs")
    parser.add_argument("--calibration", choices=("demo", "default"), default="demo",
                        help="the demo's calibration (4,096 tokens, windows of 128) or the command line's")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        calibration_file = write_documents(Path(tmp) / "calibration.jsonl", CALIBRATION_MODULES)
        held_out_file = write_documents(Path(tmp) / "held-out.jsonl", HELD_OUT_MODULES)
        pairs = {"fixture": lambda: (FIXTURES / "tiny-teacher", FIXTURES / "tiny-student"), "deep": deep_pair}
        for name, make in pairs.items():
            if args.only not in (None, name):
                continue
            teacher, student = make()
            job = open_job(str(teacher), str(student), [])
            tokenizer = load_tokenizer(job.teacher.directory)
            loaded = LoadedPair(job, torch.device("cpu"), torch.float32)
            calibration = (load_text(calibration_file, tokenizer, SEQ_LEN, CALIBRATION_TOKENS)
                           if args.calibration == "demo" else calibration_text(job, calibration_file, tokenizer))
            results[name] = compare(loaded, calibration, load_text(held_out_file, tokenizer, SEQ_LEN, HELD_OUT_TOKENS),
                                    name == "fixture")
            print(f"\n## {name}: greedy order {results[name]['greedy_order']}\n")
            print("\n".join(table(results[name])), flush=True)
    titles = {"fixture": (args.out, "Fixture pair: blocks per size by greedy KL, search and held-out oracle"),
              "deep": (args.deep_out, "Deeper pair (15 blocks): greedy KL against beam search")}
    for name, result in results.items():
        plot(*titles[name][:1], result, titles[name][1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
