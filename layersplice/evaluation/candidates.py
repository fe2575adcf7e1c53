"""Run many splices of one pair over the same text, each only from the first block where it differs.

The hidden state after block i of a splice depends only on its choices for
blocks 0..i (block 0's choice also decides the embeddings), so every splice
that agrees on blocks 0..i shares it. The runner keeps these states, per batch
of windows, for the splices it has run, and starts each new splice from the
deepest state it shares with one of them: a splice that differs from a scored
one only in its last blocks costs only those blocks and the head.

Memory is bounded: states live in a least-recently-used cache of at most
`cache_bytes` (and a quarter of the memory free on the device); past it the oldest are dropped and recomputed when needed, so
the bound costs time, never a wrong result. A layer-forward is one decoder
layer run over the whole text; `spent` counts them as they run, `full_passes`
what running every splice from its first layer would have cost, and `heads`
the final norm + head runs (one per splice, cached or not), which weigh
`head_weight` layer-forwards each: a large vocabulary makes the head cost
several layers.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch

from layersplice.evaluation.in_memory import LoadedPair
from layersplice.evaluation.perplexity import EvalText, window_batches
from layersplice.planning.plan import Plan, make_plan

CACHE_BYTES = 2 << 30
Decisions = tuple[bool, ...]  # for each block in turn: patched?
Consume = Callable[[frozenset[int], int, torch.Tensor, torch.Tensor], None]


class StateCache:
    """Tensors by key, least recently used dropped first once they hold more than `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit, self.bytes = limit, 0
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def get(self, key: tuple) -> torch.Tensor | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: tuple, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if key in self._entries or size > self.limit:
            return
        self._entries[key] = value
        self.bytes += size
        while self.bytes > self.limit:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()


class _Inject(torch.nn.Module):
    """Stands in for the layers before the resume point: returns the cached state they would produce."""

    def __init__(self, state: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        self.state, self.as_tuple = state, as_tuple

    def forward(self, *args, **kwargs):
        return (self.state,) if self.as_tuple else self.state


class SpliceRunner:
    """Logits of splices batch by batch, each splice run from the deepest state it shares with those run before."""

    def __init__(self, loaded: LoadedPair, text: EvalText, batch_size: int, cache_bytes: int = CACHE_BYTES) -> None:
        self.loaded, self.text, self.batch_size = loaded, text, batch_size
        self.n = loaded.job.pair.alignment.n_student
        self.cache = StateCache(min(cache_bytes, _free_bytes(loaded.device) // 4))
        self.spent = 0.0
        self.full_passes = 0.0
        self.heads = 0.0
        self.head_weight = _head_weight(loaded.job.pair.teacher)
        self._as_tuple = False
        windows = len(text.windows.ids)
        # Each batch's share of the text: a layer run over one batch is this much of a layer-forward.
        self._shares = [min(batch_size, windows - start) / windows for start in range(0, windows, batch_size)]
        self.batches = len(self._shares)

    def decisions(self, patched: frozenset[int]) -> Decisions:
        return tuple(b in patched for b in range(self.n))

    def run(self, sets: Sequence[frozenset[int]], consume: Consume,
            before_batch: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """consume(set, batch index, logits, mask) for every set and batch; sets share states in prefix order.

        before_batch(batch index, ids, mask), when given, runs first in each batch (the teacher's targets)."""
        ordered = sorted(dict.fromkeys(sets), key=self.decisions)
        models = {s: self.model(s) for s in ordered}
        self.full_passes += sum(plan.n_layers for _, plan in models.values())
        for index, (ids, mask) in enumerate(window_batches(self.text, self.batch_size, self.loaded.device)):
            if before_batch is not None:
                before_batch(index, ids, mask)
            for s in ordered:
                consume(s, index, self.logits(*models[s], index, ids, mask), mask)

    def model(self, patched: frozenset[int]) -> tuple[torch.nn.Module, Plan]:
        plan = make_plan(self.loaded.job.pair, patched, self.loaded.job.cast)
        return self.loaded.model(plan, shared=True), plan

    @torch.inference_mode()
    def logits(self, model, plan: Plan, index: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One batch's logits of one splice, resumed from the deepest cached state."""
        decisions = self.decisions(plan.patched)
        done, state = self._deepest(index, decisions)
        starts = self._block_starts(plan.patched)
        start = starts[done]
        self.spent += (plan.n_layers - start) * self._shares[index]
        self.heads += self._shares[index]
        with self._resumed(model, plan, start, state), self._recording(model, plan, index, decisions, done):
            return model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits

    def work(self) -> float:
        """Layer-forwards spent so far, each head counted as `head_weight` of them."""
        return self.spent + self.heads * self.head_weight

    def estimate(self, patched: frozenset[int]) -> float:
        """The work() running this splice would add now, given the states cached."""
        decisions = self.decisions(patched)
        starts = self._block_starts(patched)
        total = 0.0
        for index, share in enumerate(self._shares):
            done = next((k for k in range(self.n, 0, -1) if (index, decisions[:k]) in self.cache), 0)
            total += (starts[-1] - starts[done] + self.head_weight) * share
        return total

    def _deepest(self, index: int, decisions: Decisions) -> tuple[int, torch.Tensor | None]:
        """(blocks already done, the state after them) for the longest cached prefix of `decisions`."""
        for done in range(self.n, 0, -1):
            state = self.cache.get((index, decisions[:done]))
            if state is not None:
                return done, state
        return 0, None

    def _block_starts(self, patched: frozenset[int]) -> list[int]:
        """Output index of the first layer of each block, then the layer count."""
        starts = [0]
        for block in range(self.n):
            starts.append(starts[-1] + (self.loaded.job.pair.alignment.block_length(block) if block in patched else 1))
        return starts

    def _layers(self, model, plan: Plan) -> torch.nn.ModuleList:
        return model.get_submodule(self.loaded.job.pair.layout(plan.embeddings_from).prefix)

    @contextlib.contextmanager
    def _resumed(self, model, plan: Plan, start: int, state: torch.Tensor | None) -> Iterator[None]:
        """The model's first `start` layers replaced by the state they would produce."""
        if state is None:
            yield
            return
        layers = self._layers(model, plan)
        originals = list(layers[:start])
        inject = _Inject(state, self._as_tuple)
        for i in range(start):
            layers[i] = inject
        try:
            yield
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer

    @contextlib.contextmanager
    def _recording(self, model, plan: Plan, index: int, decisions: Decisions, done: int) -> Iterator[None]:
        """Cache the state after each block from `done` on, as the model runs."""
        layers = self._layers(model, plan)
        ends = self._block_starts(plan.patched)[1:]
        handles = []
        for block in range(done, self.n):
            def keep(module, args, output, key=(index, decisions[: block + 1])):
                self._as_tuple = isinstance(output, tuple)
                self.cache.put(key, output[0] if self._as_tuple else output)

            handles.append(layers[ends[block] - 1].register_forward_hook(keep))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()



def _head_weight(layout) -> float:
    """The head's matrix multiply (vocabulary x hidden) in units of an average decoder layer's."""
    layer = sum(t.numel for layer in layout.layers for t in layer) / max(1, layout.n_layers)
    return max(t.numel for t in layout.embeddings) / layer if layer else 0.0


def _free_bytes(device: torch.device) -> int:
    """Memory free on the device now: the GPU's, or the RAM Linux says is available (page cache included)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):  # not Linux: keep the fixed bound
        return CACHE_BYTES * 4
