"""--order kl: choose the patch order by KL to the teacher on calibration text.

Greedy, as KLPatch (METHOD.md §4): starting from the student, each step
patches the one block that brings the output distribution closest to the
teacher's, KL(teacher || model) per token on the calibration text. The greedy
order is then compared with the reference orders first and last by the mean KL
over every parameter budget between student and teacher (the model a budget
buys is the largest one along the order that fits); the best of the three is
the order used, so --order kl is never worse than both on the calibration text.

Memory: the teacher and student weights once (every candidate model is made of
references to them), one batch's logits of the teacher and of one candidate,
and the cached hidden states (candidates.py, at most CACHE_BYTES). Cost:
n(n+1)/2 - 1 candidates for a student of n blocks, and the few first/last
prefixes the greedy search did not already score; each candidate runs only
from the block it adds (the state before it is the previous step's), and the
teacher runs once. On the fixture pair and a 19-block student that is about a
third to a half of the layer-forwards of running every candidate and the
teacher from the first layer (bench/RESULTS.md, orders).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from layersplice.evaluation.in_memory import LoadedPair, compute_dtype, pick_device
from layersplice.evaluation.candidates import CACHE_BYTES, SpliceRunner
from layersplice.evaluation.perplexity import EvalText, load_text, load_tokenizer
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
    layer_forwards: dict[str, float]  # KLScorer.cost(): spent, and what full passes would have cost

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
                "layer_forwards": self.layer_forwards,
            },
        }


class KLScorer:
    """Mean per-token KL(teacher || splice) on the calibration text, each set of patched blocks scored once.

    Splices run through one SpliceRunner, so each starts from the deepest
    hidden state it shares with a splice scored before (candidates.py); the
    teacher's targets come from its own cached states, so it runs once.
    """

    def __init__(self, loaded: LoadedPair, text: EvalText, batch_size: int = CALIB_BATCH,
                 cache_bytes: int = CACHE_BYTES) -> None:
        self.runner = SpliceRunner(loaded, text, batch_size, cache_bytes)
        self.n = loaded.job.pair.alignment.n_student
        self.n_teacher = loaded.job.pair.alignment.n_teacher
        everything = frozenset(range(self.n))
        self.teacher = self.runner.model(everything)
        self.known: dict[frozenset[int], float] = {everything: 0.0}
        # After each candidate's batch: on_progress(sets scored, sets of this round under way, the share of the
        # round done, layer-forwards spent as cost() counts them). The teacher is not counted as scored.
        self.on_progress: Callable[[int, int, float, float], None] | None = None

    def scores(self, sets: list[frozenset[int]]) -> list[float]:
        missing = [s for s in dict.fromkeys(sets) if s not in self.known]
        if missing:
            self.known.update(zip(missing, self._measure(missing)))
        return [self.known[s] for s in sets]

    def _measure(self, sets: list[frozenset[int]]) -> list[float]:
        sums = dict.fromkeys(sets, 0.0)
        target: list[Target] = []
        tokens = 0
        runs = [0]  # candidates' batches run this round

        def teacher(index: int, ids: torch.Tensor, mask: torch.Tensor) -> None:
            nonlocal tokens
            target[:] = [Target.of(self.runner.logits(*self.teacher, index, ids, mask), mask)]
            tokens += int(mask.sum())

        def add(patched: frozenset[int], index: int, logits: torch.Tensor, mask: torch.Tensor) -> None:
            sums[patched] += target[0].kl_sum(logits)
            if self.on_progress is not None:
                runs[0] += 1
                # The runner goes batch by batch through every candidate, so candidates finish in the last batch.
                finished = max(0, runs[0] - (self.runner.batches - 1) * len(sets))
                self.on_progress(len(self.known) - 1 + finished, len(sets) - finished,
                                 runs[0] / (len(sets) * self.runner.batches), self.runner.spent)

        self.runner.run(sets, add, teacher)
        # Without the cache the teacher ran once for each round of candidates.
        self.runner.full_passes += self.n_teacher
        return [sums[s] / tokens for s in sets]

    def curve(self, order: list[int]) -> list[float]:
        return self.scores([frozenset(order[:k]) for k in range(self.n + 1)])

    def cost(self) -> dict[str, float]:
        """Layer-forwards (one decoder layer over the whole calibration text) spent, what full passes of the same
        models would have cost, and the head passes (one per model scored, and the teacher's)."""
        runner = self.runner
        return {"spent": round(runner.spent, 2), "full_passes": round(runner.full_passes, 2),
                "heads": round(runner.heads, 2)}


@dataclass(frozen=True)
class Target:
    """The teacher's next-token distribution on one batch, ready to score many models against.

    KL(p || q) per token is sum p log p - sum p z + logsumexp(z) for the model's
    logits z (sum p = 1), so each model costs one logsumexp and one dot product
    with the teacher's probabilities, which are computed once."""

    probs: torch.Tensor  # [batch, seq, vocab]
    self_term: torch.Tensor  # [batch, seq]: sum p log p
    mask: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor, mask: torch.Tensor) -> Target:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        probs = log_probs.exp()
        return cls(probs, (probs * log_probs).sum(-1), mask)

    def kl_per_token(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(teacher || model) at each position, 0 where the mask has no real token: [batch, seq]."""
        logits = logits.float()
        per_token = self.self_term - (self.probs * logits).sum(-1) + torch.logsumexp(logits, dim=-1)
        return torch.where(self.mask, per_token, 0)

    def kl_sum(self, logits: torch.Tensor) -> float:
        """Sum over real tokens of KL(teacher || model)."""
        return float(self.kl_per_token(logits).sum())


def greedy_order(scorer: KLScorer, on_step=None) -> list[int]:
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
    return kl_order_from(KLScorer(loaded, text, batch_size), on_step)


def kl_order_from(scorer: KLScorer, on_step=None) -> KLOrder:
    """The greedy order and the choice among greedy, first and last, on a scorer that may know some sets already."""
    pair = scorer.runner.loaded.job.pair
    alignment = pair.alignment
    orders = {"greedy": greedy_order(scorer, on_step)}
    orders.update({name: patch_order(alignment, name) for name in ("first", "last")})
    curves, budget = {}, {}
    for name, order in orders.items():
        curves[name] = scorer.curve(order)
        params = [make_plan(pair, frozenset(order[:k])).params for k in range(scorer.n + 1)]
        budget[name] = budget_mean_kl(curves[name], params)
    best = min(orders, key=lambda name: (budget[name], name != "greedy"))
    return KLOrder(tuple(orders[best]), tuple(orders["greedy"]), best, curves, budget,
                   scorer.runner.text.describe(), scorer.cost())


def calibration_text(job: Job, calib: Path, tokenizer) -> EvalText:
    limit = job.teacher.config.get("max_position_embeddings") or CALIB_SEQ_LEN
    return load_text(calib, tokenizer, min(CALIB_SEQ_LEN, limit), CALIB_TOKENS)


def loaded_calibration(job: Job, calib: Path) -> tuple[LoadedPair, EvalText]:
    """Both models, each read once, on the GPU if there is one, and the calibration text in the teacher's tokens."""
    device = pick_device("auto")
    loaded = LoadedPair(job, device, compute_dtype(job, device))
    return loaded, calibration_text(job, calib, load_tokenizer(job.teacher.directory))


def kl_order_for(job: Job, calib: Path, on_step=None) -> KLOrder:
    """--order kl for a job."""
    return choose_kl_order(*loaded_calibration(job, calib), on_step=on_step)
