"""--order search: for each size, the blocks whose patching brings the model closest to the teacher.

For every layer count between student and teacher, the set of patched blocks
with the lowest KL(teacher || model) on the calibration text (the measure of
--order kl). Each size is chosen on its own, so sizes need not be nested, and
one-layer blocks, which change weights but not the size, are free choices at
every size. The pure student and teacher stay the family's ends.

* Exact where a size has at most `budget` candidate sets: all are scored.
  The default, 256, makes every size of any 9-block student exact.
* Otherwise a beam search of width `beam`: the beam of a size starts from the
  greedy kl order's set, first's and last's, and each beam set of the smaller
  sizes with one more block; swap moves (one patched block for an unpatched
  one of the same length) and one-layer block toggles of the beam follow
  while they improve it. The moves of better-ranked beam sets are scored
  first, the cheaper first among them, and the whole search stops adding
  candidates once it has done the work the greedy order did without the cache
  (layer-forwards, and head passes weighted by the head's size against a
  layer's), spread evenly over the beam's sizes.

The greedy kl order runs on the same scorer, and its set at every size is one
of the candidates there, so no size is worse than greedy's on the
calibration text. All candidates share one KLScorer, so each runs only from
the first block where it differs from a model already scored (candidates.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from layersplice.errors import LayerspliceError
from layersplice.evaluation.in_memory import LoadedPair
from layersplice.evaluation.kl_order import (
    CALIB_BATCH, KLOrder, KLScorer, budget_mean_kl, kl_order_from, loaded_calibration,
)
from layersplice.evaluation.perplexity import EvalText
from layersplice.planning.alignment import Alignment
from layersplice.planning.blocks import BEAM, SEARCH_BUDGET, SizeChoices, by_layers, patch_order, size_of
from layersplice.planning.job import Job
from layersplice.planning.plan import make_plan

EXACT, BEAM_SEARCH = "exact", "beam"


@dataclass(frozen=True)
class SizeSearch:
    """One size's choice and how it was found."""

    layers: int
    patched: tuple[int, ...]
    kl: float
    greedy_patched: tuple[int, ...] | None  # None where the greedy order has no model of this size
    greedy_kl: float | None
    method: str  # EXACT or BEAM_SEARCH
    subsets: int  # sets of blocks that make a model of this size
    scored: int  # how many of them were scored

    def record(self) -> dict:
        return {
            "layers": self.layers, "patched_blocks": list(self.patched), "kl": self.kl, "method": self.method,
            "subsets": self.subsets, "scored": self.scored,
            "greedy_patched_blocks": None if self.greedy_patched is None else list(self.greedy_patched),
            "greedy_kl": self.greedy_kl,
        }


@dataclass(frozen=True)
class SearchOrder:
    """Every size's choice, the kl order found on the way, and what the search cost."""

    sizes: tuple[SizeSearch, ...]
    kl: KLOrder
    budget: int
    beam: int
    # KLScorer.cost(), and greedy_without_cache, greedy_heads_without_cache: what --order kl cost before the cache
    layer_forwards: dict[str, float]
    # Mean KL over parameter budgets (kl_order.budget_mean_kl) along the chosen sizes ("search") and
    # along greedy's sets of the same sizes ("greedy", where greedy reaches every size).
    budget_kl: dict[str, float]

    def choices(self) -> SizeChoices:
        return SizeChoices(tuple((s.layers, s.patched) for s in self.sizes))

    def record(self) -> dict:
        """What goes into layersplice.json (and --order-file reads back)."""
        return {
            "order": "search",
            "search": {
                "sizes": [s.record() for s in self.sizes],
                "search_budget": self.budget,
                "beam": self.beam,
                "budget_mean_kl": self.budget_kl,
                "greedy_order": list(self.kl.greedy),
                "layer_forwards": self.layer_forwards,
                "calibration": self.kl.calibration,
            },
        }


def subsets_count(alignment: Alignment, layers: int) -> int:
    """How many sets of blocks make a model of `layers` layers."""
    ways = {alignment.n_student: 1}
    for block in range(alignment.n_student):
        extra = alignment.block_length(block) - 1
        grown = dict(ways)
        for size, count in ways.items():
            grown[size + extra] = grown.get(size + extra, 0) + count
        ways = grown
    return ways.get(layers, 0)


def subsets_of_size(alignment: Alignment, layers: int) -> Iterator[frozenset[int]]:
    """Every set of blocks that makes a model of `layers` layers."""
    def extend(block: int, room: int, chosen: tuple[int, ...]) -> Iterator[frozenset[int]]:
        if block == alignment.n_student:
            if room == 0:
                yield frozenset(chosen)
            return
        yield from extend(block + 1, room, chosen)
        extra = alignment.block_length(block) - 1
        if extra <= room:
            yield from extend(block + 1, room - extra, (*chosen, block))

    yield from extend(0, layers - alignment.n_student, ())


def greedy_cost_without_cache(alignment: Alignment, kl: KLOrder) -> tuple[float, float]:
    """(layer-forwards, head passes) of --order kl before the cache: each round ran the teacher and every
    new candidate from the first layer."""
    n, everything = alignment.n_student, frozenset(range(alignment.n_student))
    known, layers, heads = {everything}, 0.0, 0.0
    rounds = [[frozenset(kl.greedy[:step]) | {b} for b in range(n) if b not in kl.greedy[:step]] for step in range(n)]
    for order in (kl.greedy, patch_order(alignment, "first"), patch_order(alignment, "last")):
        rounds.append([frozenset(order[:k]) for k in range(n + 1)])
    for sets in rounds:
        missing = {s for s in sets if s not in known}
        known.update(missing)
        if missing:
            layers += alignment.n_teacher + sum(size_of(alignment, s) for s in missing)
            heads += 1 + len(missing)
    return layers, heads


def search_order(loaded: LoadedPair, text: EvalText, budget: int = SEARCH_BUDGET, beam: int = BEAM,
                 batch_size: int = CALIB_BATCH, on_progress=None) -> SearchOrder:
    """on_progress, when given, hears how far the scoring has gone (KLScorer.on_progress)."""
    if budget < 0 or beam < 1:
        raise LayerspliceError("--search-budget must be at least 0 and --beam at least 1")
    scorer = KLScorer(loaded, text, batch_size)
    scorer.on_progress = on_progress
    alignment = loaded.job.pair.alignment
    sizes = [n for n in range(alignment.n_student + 1, alignment.n_teacher) if subsets_count(alignment, n)]
    exact = [n for n in sizes if subsets_count(alignment, n) <= budget]
    # One round for every exact size: its candidates share their prefixes, and the greedy order then costs nothing.
    scorer.scores([s for n in exact for s in subsets_of_size(alignment, n)])
    kl = kl_order_from(scorer)
    greedy_layers, greedy_heads = greedy_cost_without_cache(alignment, kl)
    cap = greedy_layers + greedy_heads * scorer.runner.head_weight
    greedy = {n: _along(alignment, kl.greedy, n) for n in sizes}
    seeds = {n: [s for s in dict.fromkeys((greedy[n], _along(alignment, "first", n), _along(alignment, "last", n)))
                 if s is not None] for n in sizes}
    _Beam(scorer, alignment, beam, cap).run(sizes, exact, seeds)
    found = [_best(scorer, alignment, n, greedy[n], EXACT if n in exact else BEAM_SEARCH) for n in sizes]
    cost = {**scorer.cost(), "greedy_without_cache": greedy_layers, "greedy_heads_without_cache": greedy_heads}
    budget_kl = {"search": _budget_kl(scorer, [frozenset(s.patched) for s in found])}
    if all(s is not None for s in greedy.values()):
        budget_kl["greedy"] = _budget_kl(scorer, list(greedy.values()))
    return SearchOrder(tuple(found), kl, budget, beam, cost, budget_kl)


def _along(alignment: Alignment, order, layers: int) -> frozenset[int] | None:
    """The set an order builds at this size (as `build --layers` would), or None where it has no such size."""
    try:
        return by_layers(alignment, layers, order)
    except LayerspliceError:
        return None


def _best(scorer: KLScorer, alignment: Alignment, layers: int, greedy: frozenset[int] | None,
          method: str) -> SizeSearch:
    """The lowest-KL set scored at this size; on a tie greedy's, then the lowest block numbers."""
    scored = [(kl, s) for s, kl in scorer.known.items() if size_of(alignment, s) == layers]
    kl, best = min(scored, key=lambda item: (item[0], item[1] != greedy, sorted(item[1])))
    greedy_kl = None if greedy is None else scorer.scores([greedy])[0]
    return SizeSearch(layers, tuple(sorted(best)), kl, None if greedy is None else tuple(sorted(greedy)), greedy_kl,
                      method, subsets_count(alignment, layers), len(scored))


def _budget_kl(scorer: KLScorer, middle: list[frozenset[int]]) -> float:
    """Mean KL over parameter budgets along the student, these sets and the teacher (kl_order.budget_mean_kl)."""
    pair = scorer.runner.loaded.job.pair
    sets = [frozenset(), *middle, frozenset(range(scorer.n))]
    params = [make_plan(pair, s).params for s in sets]
    order = sorted(range(len(sets)), key=lambda i: params[i])
    return budget_mean_kl([scorer.scores([sets[i]])[0] for i in order], [params[i] for i in order])


class _Beam:
    """The beam search over the sizes that are too many to score exhaustively, within a layer-forward cap."""

    def __init__(self, scorer: KLScorer, alignment: Alignment, width: int, cap: float) -> None:
        self.scorer, self.alignment, self.width, self.cap = scorer, alignment, width, cap
        blocks = range(alignment.n_student)
        self.singles = [b for b in blocks if alignment.block_length(b) == 1]
        self.multi = [b for b in blocks if alignment.block_length(b) > 1]

    def run(self, sizes: list[int], exact: list[int], seeds: dict[int, list[frozenset[int]]]) -> None:
        """Beam search the sizes not in `exact` (whose sets are all scored already), smallest first."""
        beams: dict[int, list[frozenset[int]]] = {self.alignment.n_student: [frozenset()]}
        left = len(sizes) - len(exact)
        for layers in sizes:
            if layers in exact:
                beams[layers] = self._top(layers)
                continue
            share = (self.cap - self.scorer.runner.work()) / left
            left -= 1
            pool = dict.fromkeys(seeds[layers], -1)
            for smaller, sets in beams.items():
                for rank, s in enumerate(sets):
                    for b in self.multi:
                        if b not in s and smaller < layers == size_of(self.alignment, s | {b}):
                            pool.setdefault(s | {b}, rank)
            beams[layers] = self._improve(layers, self._with_toggles(pool), share)

    def _top(self, layers: int) -> list[frozenset[int]]:
        """The `width` lowest-KL sets scored at this size."""
        scored = sorted((kl, sorted(s), s) for s, kl in self.scorer.known.items() if size_of(self.alignment, s) == layers)
        return [s for _, _, s in scored[: self.width]]

    def _improve(self, layers: int, frontier: dict[frozenset[int], int], share: float) -> list[frozenset[int]]:
        """Score the frontier within `share`, then the beam's neighbours while the beam improves."""
        limit = self.scorer.runner.work() + share
        beam: list[frozenset[int]] = []
        while True:
            self._score_within(frontier, min(limit, self.cap))
            better = self._top(layers)
            if better == beam:
                return beam
            beam = better
            frontier = {}
            for rank, s in enumerate(beam):
                for neighbour in self._swaps(s):
                    frontier.setdefault(neighbour, rank)
            frontier = self._with_toggles(frontier)

    def _score_within(self, frontier: dict[frozenset[int], int], limit: float) -> None:
        """Score what fits within `limit`: the neighbours of better-ranked sets first, the cheaper first among them."""
        runner = self.scorer.runner
        todo = sorted((rank, runner.estimate(s), sorted(s), s) for s, rank in frontier.items()
                      if s not in self.scorer.known)
        chosen, total = [], runner.work()
        for _, cost, _, s in todo:
            if total + cost <= limit:
                chosen.append(s)
                total += cost
        if chosen:
            self.scorer.scores(chosen)

    def _swaps(self, patched: frozenset[int]) -> list[frozenset[int]]:
        """One patched multi-layer block for an unpatched one of the same length: the same size."""
        length = self.alignment.block_length
        return [patched - {a} | {b} for a, b in itertools.product(sorted(patched), self.multi)
                if b not in patched and length(a) == length(b) > 1]

    def _with_toggles(self, ranked: dict[frozenset[int], int]) -> dict[frozenset[int], int]:
        """The sets and each with one one-layer block toggled (the same size), at their set's rank."""
        toggled = dict(ranked)
        for s, rank in ranked.items():
            for b in self.singles:
                toggled.setdefault(s ^ {b}, rank)
        return toggled


def search_order_for(job: Job, calib: Path, budget: int = SEARCH_BUDGET, beam: int = BEAM,
                     on_progress=None) -> SearchOrder:
    """--order search for a job."""
    return search_order(*loaded_calibration(job, calib), budget, beam, on_progress=on_progress)
