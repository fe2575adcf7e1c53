"""The paper's comparisons in miniature, on the fixture pair: one table and one PNG.

On the held-out text of `layersplice demo` (stdlib_text.HELD_OUT_MODULES), at
every size of the 1/2/2 family of fixtures/tiny-teacher:

* boomerang interpolation of fixtures/tiny-student in the orders last, first
  and kl (kl calibrated on stdlib_text.CALIBRATION_MODULES);
* naive layer dropping: the teacher's own layers at order last's selections;
* students of two intermediate sizes (a third and two thirds of the way from
  student to teacher) distilled directly from the teacher,
  initialised with those sizes' kept teacher layers (order last), on the same
  tokens and steps as the fixture student (fixtures/make_tiny_pair.py);
* two ablations, each distilled like the fixture student and interpolated
  (order last): no cosine term (--cos-weight 0), and a randomly initialised
  student of the same shape.

    python bench/science.py [--out bench/science.png]     # about 15 minutes on 1 thread
    python bench/science.py --quick --out /tmp/s.png       # about a minute: a smoke test

--quick distills 2 steps on the first 60 training documents, calibrates the
KL order on 256 tokens and measures 2,048: it checks that every comparison
runs, and its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from layersplice.evaluation.in_memory import LoadedPair
from layersplice.evaluation.kl_order import calibration_text, choose_kl_order
from layersplice.evaluation.perplexity import (
    EvalRequest, EvalText, SizeResult, evaluate_family, load_text, load_tokenizer, negative_log_likelihood,
)
from layersplice.evaluation.plot import Curve, plot_family
from layersplice.evaluation.stdlib_text import CALIBRATION_MODULES, HELD_OUT_MODULES, write_documents
from layersplice.planning.job import Job, open_job
from layersplice.planning.sizes import family_sizes

from fixture_script import make_tiny_pair

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SEQ_LEN = 128
TOKENS = 16_384
QUICK_DOCUMENTS = 60  # --quick distills on these first documents only: enough for its held-out split
QUICK_CALIBRATION_TOKENS = 256  # --quick: the KL order's 15 candidates on one window each
STUDENT_FILES = ("student_config.json", "tokenizer.json", "tokenizer_config.json")


def kept_layers(job: Job, layers: int) -> list[int]:
    """The teacher layers an order-last size of `layers` layers is made of."""
    copied = job.pair.alignment.copied
    plan = next(plan for _, plan in family_sizes(job, "last", "all") if plan.n_layers == layers)
    return [copied[layer.source_layer] if layer.model == "student" else layer.source_layer for layer in plan.layers]


def direct_sizes(job: Job) -> list[int]:
    """Two intermediate sizes (layer counts) to distill directly: a third and two thirds of the way up."""
    middle = sorted({plan.n_layers for _, plan in family_sizes(job, "last", "all")})[1:-1]
    return sorted({middle[len(middle) // 3], middle[(2 * len(middle)) // 3]}) if len(middle) > 2 else middle


def random_student(init: Path, out: Path, seed: int) -> Path:
    """A student of the same shape and alignment as `init`, every weight drawn at random."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(init)).save_pretrained(out)
    for name in STUDENT_FILES:
        shutil.copyfile(init / name, out / name)
    return out


def perplexity_of(directory: Path, text: EvalText) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    total, count = negative_log_likelihood(model, text, 8, torch.device("cpu"))
    return math.exp(total / count)


def train_students(recipe, teacher: Path, job: Job, work: Path, steps: int | None) -> tuple[dict, dict]:
    """({ablation: student dir}, {layers: directly distilled student dir}), each distilled like the fixture."""
    from layersplice.distill.losses import LossWeights

    data_file, _ = recipe.write_text(work, QUICK_DOCUMENTS if steps else None)
    init = recipe.init_student(teacher, work / "init")
    ablations = {
        "no cosine term": recipe.distill_student(teacher, init, work / "no-cos", data_file, LossWeights(cos=0.0), steps),
        "random init": recipe.distill_student(
            teacher, random_student(init, work / "random-init", recipe.SEED), work / "random", data_file, steps=steps),
    }
    print("held-out CE before/after distilling:", json.dumps(ablations), flush=True)
    directs = {}
    for layers in direct_sizes(job):
        start = recipe.init_student(teacher, work / f"init-{layers}", "--copied-teacher-layers",
                                    ",".join(map(str, kept_layers(job, layers))))
        recipe.distill_student(teacher, start, work / f"direct-{layers}", data_file, steps=steps)
        directs[layers] = work / f"direct-{layers}"
    return {"no cosine term": work / "no-cos", "random init": work / "random"}, directs


def measure(args, work: Path) -> tuple[dict[str, list[SizeResult]], dict[int, float], dict]:
    """({curve name: every size's result}, {layers: a direct student's perplexity}, what the run used)."""
    recipe = make_tiny_pair()
    teacher, student = FIXTURES / "tiny-teacher", FIXTURES / "tiny-student"
    job = open_job(str(teacher), str(student), [])
    held_out = write_documents(work / "held-out.jsonl", HELD_OUT_MODULES)
    calibration = write_documents(work / "calibration.jsonl", CALIBRATION_MODULES)
    tokenizer = load_tokenizer(teacher)
    calibration = (load_text(calibration, tokenizer, SEQ_LEN, QUICK_CALIBRATION_TOKENS) if args.quick
                   else calibration_text(job, calibration, tokenizer))
    chosen = choose_kl_order(LoadedPair(job, torch.device("cpu"), torch.float32), calibration)
    request = EvalRequest(held_out, baseline=True, seq_len=SEQ_LEN, max_tokens=args.tokens, device="cpu")
    curves = {order: evaluate_family(job, blocks, request)[0]
              for order, blocks in (("last", "last"), ("first", "first"), ("kl", chosen.blocks))}
    ablations, directs = train_students(recipe, teacher, job, work, 2 if args.quick else None)
    plain = EvalRequest(held_out, seq_len=SEQ_LEN, max_tokens=args.tokens, device="cpu")
    for name, directory in ablations.items():
        curves[name] = evaluate_family(open_job(str(teacher), str(directory), []), "last", plain)[0]
    text = load_text(held_out, tokenizer, SEQ_LEN, args.tokens)
    direct = {layers: perplexity_of(directory, text) for layers, directory in directs.items()}
    return curves, direct, {"kl_patch_order": list(chosen.blocks), "tokens": text.tokens}


def table(curves: dict[str, list[SizeResult]], direct: dict[int, float]) -> list[str]:
    names = ["last", "first", "kl", "no cosine term", "random init"]
    lines = ["| layers | non-embedding params | interpolation last | first | kl | naive dropping | "
             "directly distilled | no cosine term (last) | random init (last) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, row in enumerate(curves["last"]):
        cells = [f"{curves[name][i].perplexity:.2f}" for name in names]
        label = f"{row.layers} ({row.role})" if row.role != "interpolated" else str(row.layers)
        lines.append(f"| {label} | {row.non_embedding_parameters:,} | {' | '.join(cells[:3])} | "
                     f"{row.naive_perplexity:.2f} | {f'{direct[row.layers]:.2f}' if row.layers in direct else ''} | "
                     f"{' | '.join(cells[3:])} |")
    return lines


def plot(path: Path, curves: dict[str, list[SizeResult]], direct: dict[int, float]) -> None:
    last = curves["last"]
    core = {r.layers: r.non_embedding_parameters for r in last}
    lines = [Curve(f"interpolation, order {name}", list(core.values()), [r.perplexity for r in curves[name]])
             for name in ("last", "first", "kl")]
    lines.append(Curve("naive layer dropping", list(core.values()), [r.naive_perplexity for r in last], "--"))
    lines.append(Curve("ablation: no cosine term, interpolated", list(core.values()),
                       [r.perplexity for r in curves["no cosine term"]], ":"))
    random_init = [r.perplexity for r in curves["random init"]]
    shown = (0.97 * last[-1].perplexity, 1.05 * max(r.naive_perplexity for r in last))
    lines.append(Curve(f"ablation: random init, interpolated (up to {max(random_init):,.0f})", list(core.values()),
                       random_init, ":"))
    lines.append(Curve("distilled directly at that size", [core[n] for n in direct], list(direct.values()), "none", marker="D"))
    plot_family(path, lines, (last[0].non_embedding_parameters, last[0].perplexity),
                (last[-1].non_embedding_parameters, last[-1].perplexity), "perplexity (held-out text)",
                "Boomerang distillation on the fixture pair", xlabel="non-embedding parameters", y_range=shown)


def claims(curves: dict[str, list[SizeResult]], direct: dict[int, float]) -> list[str]:
    """Each of the paper's claims, checked on these numbers."""
    last = curves["last"]
    by_layers = {r.layers: r for r in last}
    middle = last[1:-1]

    def falling(rows: list[SizeResult]) -> str:
        values = [r.perplexity for r in rows]
        return "yes" if all(a > b for a, b in zip(values, values[1:])) else "no"

    teacher = last[-1].perplexity
    return [
        f"student/teacher perplexity: {last[0].perplexity / teacher:.2f}x; naive dropping to the student's size: "
        f"{last[0].naive_perplexity / teacher:.2f}x",
        "interpolation falls monotonically with size: " + ", ".join(f"{o} {falling(curves[o])}" for o in ("last", "first", "kl")),
        f"interpolation (last) beats naive dropping at {sum(r.margin > 0 for r in middle)}/{len(middle)} "
        f"intermediate sizes; smallest margin {min(r.margin for r in middle):+.2f}",
        "interpolation (last) against direct distillation: " + ", ".join(
            f"{n} layers {by_layers[n].perplexity:.2f} vs {p:.2f}" for n, p in direct.items()),
        "without the cosine term, interpolation falls monotonically: " + falling(curves["no cosine term"])
        + f"; worst intermediate size {max(r.perplexity for r in curves['no cosine term'][1:-1]):.2f} "
        f"(with it: {max(r.perplexity for r in middle):.2f})",
        "from a random init, interpolation falls monotonically: " + falling(curves["random init"])
        + f"; its student {curves['random init'][0].perplexity:.2f}, worst intermediate size "
        f"{max(r.perplexity for r in curves['random init'][1:-1]):.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "science.png", help="the PNG")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="held-out tokens to measure")
    parser.add_argument("--quick", action="store_true", help="2 distill steps and 2,048 tokens: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.tokens = min(args.tokens, 2048)
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        curves, direct, run = measure(args, Path(tmp))
    plot(args.out, curves, direct)
    print(f"\n{run['tokens']} held-out tokens; kl patch order {run['kl_patch_order']}; "
          f"{time.perf_counter() - started:.0f} s on 1 thread; plot in {args.out}\n")
    print("\n".join(table(curves, direct)))
    print()
    print("\n".join(f"- {line}" for line in claims(curves, direct)))


if __name__ == "__main__":
    main()
