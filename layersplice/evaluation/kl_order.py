"""--order kl: choose the patch order by KL to the teacher on calibration text.

Greedy, as KLPatch (METHOD.md §4): starting from the student, each step
patches the one block that brings the output distribution closest to the
teacher's, KL(teacher || model) per token on the calibration text. The greedy
order is then compared with the reference orders first and last by the mean KL
over every parameter budget between student and teacher (the model a budget
buys is the largest one along the order that fits); the best of the three is
the order used, so --order kl is never worse than both on the calibration text.

Memory: the teacher and student weights once (every candidate model is made of
references to them), plus one batch's logits of the teacher and of one
candidate. Cost: n(n+1)/2 - 1 candidate forward passes over the calibration
text for a student of n blocks, n - 1 teacher passes, and the few first/last
prefixes the greedy search did not already score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from layersplice.distill.losses import kl_loss
from layersplice.evaluation.in_memory import LoadedPair, compute_dtype, pick_device
from layersplice.evaluation.perplexity import EvalText, load_text, load_tokenizer, window_batches
from layersplice.planning.blocks import patch_order
from layersplice.planning.job import Job
from layersplice.planning.plan import make_plan

CALIB_TOKENS = 16384
CALIB_SEQ_LEN = 512
CALIB_BATCH = 4


@dataclass(frozen=True)
class KLOrder:
    """The chosen order and the evidence for it."""

    blocks: tuple[int, ...]
    greedy: tuple[int, ...]
    chosen_from: str  # "greedy", "first" or "last"
    kl_curves: dict[str, list[float]]  # per order: KL after 0..n blocks are patched
    budget_kl: dict[str, float]  # per order: mean KL over parameter budgets
    calibration: dict

    def record(self) -> dict:
        """What goes into layersplice.json next to the chosen sizes."""
        return {
            "order": "kl",
            "patch_order": list(self.blocks),
            "kl_order": {
                "chosen_from": self.chosen_from,
                "greedy_order": list(self.greedy),
                "budget_mean_kl": self.budget_kl,
                "kl_after_each_block": self.kl_curves,
                "calibration": self.calibration,
            },
        }


@torch.inference_mode()
def kl_to_teacher(teacher, models: list, text: EvalText, batch_size: int, device: torch.device) -> list[float]:
    """Mean per-token KL(teacher || model) of each model; the teacher runs once per batch."""
    sums = [0.0] * len(models)
    count = 0
    for ids, mask in window_batches(text, batch_size, device):
        attention = mask.long()
        target = teacher(input_ids=ids, attention_mask=attention, use_cache=False).logits
        n = int(mask.sum())
        for i, model in enumerate(models):
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            sums[i] += float(kl_loss(logits, target, mask, 1.0)) * n
        count += n
    return [total / count for total in sums]


class _Scorer:
    """KL of patched sets, each set scored once."""

    def __init__(self, loaded: LoadedPair, text: EvalText, batch_size: int) -> None:
        self.loaded, self.text, self.batch_size = loaded, text, batch_size
        self.n = loaded.job.pair.alignment.n_student
        self.teacher = loaded.splice(frozenset(range(self.n)))
        self.known: dict[frozenset[int], float] = {frozenset(range(self.n)): 0.0}

    def scores(self, sets: list[frozenset[int]]) -> list[float]:
        missing = list(dict.fromkeys(s for s in sets if s not in self.known))
        if missing:
            models = [self.loaded.splice(s) for s in missing]
            values = kl_to_teacher(self.teacher, models, self.text, self.batch_size, self.loaded.device)
            self.known.update(zip(missing, values))
        return [self.known[s] for s in sets]

    def curve(self, order: list[int]) -> list[float]:
        return self.scores([frozenset(order[:k]) for k in range(self.n + 1)])


def greedy_order(scorer: _Scorer, on_step=None) -> list[int]:
    """Each step patches the block whose patching gives the lowest KL (lowest index on a tie)."""
    patched: list[int] = []
    while len(patched) < scorer.n:
        candidates = [b for b in range(scorer.n) if b not in patched]
        scores = scorer.scores([frozenset(patched) | {b} for b in candidates])
        best = min(range(len(candidates)), key=lambda i: (scores[i], candidates[i]))
        patched.append(candidates[best])
        if on_step:
            on_step(len(patched), candidates[best], scores[best])
    return patched


def budget_mean_kl(curve: list[float], params: list[int]) -> float:
    """Mean over parameter budgets from student to teacher of the KL the budget buys."""
    span = params[-1] - params[0]
    if span <= 0:
        return curve[0]
    return sum(kl * (params[k + 1] - params[k]) for k, kl in enumerate(curve[:-1])) / span


def choose_kl_order(loaded: LoadedPair, text: EvalText, batch_size: int = CALIB_BATCH, on_step=None) -> KLOrder:
    scorer = _Scorer(loaded, text, batch_size)
    alignment, pair = loaded.job.pair.alignment, loaded.job.pair
    orders = {"greedy": greedy_order(scorer, on_step)}
    orders.update({name: patch_order(alignment, name) for name in ("first", "last")})
    curves, budget = {}, {}
    for name, order in orders.items():
        curves[name] = scorer.curve(order)
        params = [make_plan(pair, frozenset(order[:k])).params for k in range(scorer.n + 1)]
        budget[name] = budget_mean_kl(curves[name], params)
    best = min(orders, key=lambda name: (budget[name], name != "greedy"))
    return KLOrder(tuple(orders[best]), tuple(orders["greedy"]), best, curves, budget, text.describe())


def calibration_text(job: Job, calib: Path, tokenizer) -> EvalText:
    limit = job.teacher.config.get("max_position_embeddings") or CALIB_SEQ_LEN
    return load_text(calib, tokenizer, min(CALIB_SEQ_LEN, limit), CALIB_TOKENS)


def kl_order_for(job: Job, calib: Path, on_step=None) -> KLOrder:
    """--order kl for a job: both models loaded once, on the GPU if there is one."""
    device = pick_device("auto")
    loaded = LoadedPair(job, device, compute_dtype(job, device))
    text = calibration_text(job, calib, load_tokenizer(job.teacher.directory))
    return choose_kl_order(loaded, text, on_step=on_step)
