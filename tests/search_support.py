"""Independent references for --order kl and --order search, and deeper random pairs than conftest's.

Everything here runs splices from their first layer, with models made by
splice_reference.py (whole nn.Modules moved, not layersplice's tensor plans),
and counts decoder-layer runs by wrapping the decoder layer class itself, so
neither the choices nor the costs depend on layersplice's cache or counter.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from eval_support import TEXT_MODULES, save_tokenizer
from splice_reference import load_causal_lm, splice
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from layersplice.evaluation.perplexity import EvalText, window_batches
from layersplice.evaluation.stdlib_text import module_docstrings

VOCAB = 128
CPU = torch.device("cpu")


@dataclass(frozen=True)
class DeepPair:
    teacher: Path
    student: Path
    copied: tuple[int, ...]

    def args(self) -> list[str]:
        return ["--teacher", str(self.teacher), "--student", str(self.student)]


def make_pair(root: Path, n_teacher: int, copied: tuple[int, ...], seed: int = 0, hidden: int = 32) -> DeepPair:
    """A random Llama teacher and a student of its `copied` layers, each nudged by noise as distillation would."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=n_teacher, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False)
    teacher = LlamaForCausalLM(config).eval()
    teacher.save_pretrained(root / "teacher")
    student_config = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": len(copied)})
    student = LlamaForCausalLM(student_config).eval()
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            if int(index) in copied:
                state[f"model.layers.{copied.index(int(index))}.{rest}"] = tensor + 0.05 * torch.randn_like(tensor)
        else:
            state[name] = tensor
    student.load_state_dict(state)
    student.save_pretrained(root / "student")
    pruned = [i for i in range(n_teacher) if i not in copied]
    (root / "student" / "student_config.json").write_text(
        json.dumps({"pruned_teacher_layers": pruned, "copied_teacher_layers": list(copied)}))
    documents = [module_docstrings(name) for name in TEXT_MODULES]
    for directory in (root / "teacher", root / "student"):
        save_tokenizer(directory, VOCAB, documents)
    return DeepPair(root / "teacher", root / "student", copied)


class LayerCount:
    """Decoder-layer runs over a text, in layer-forwards (one layer over every window of the text)."""

    def __init__(self, windows: int) -> None:
        self.windows, self.runs = windows, 0

    @property
    def layer_forwards(self) -> float:
        return self.runs / self.windows


@contextlib.contextmanager
def counting_layers(text: EvalText) -> Iterator[LayerCount]:
    """Count every LlamaDecoderLayer run, by the windows it ran on."""
    count = LayerCount(len(text.windows.ids))
    forward = LlamaDecoderLayer.forward

    def counted(self, hidden_states, *args, **kwargs):
        count.runs += hidden_states.shape[0]
        return forward(self, hidden_states, *args, **kwargs)

    LlamaDecoderLayer.forward = counted
    try:
        yield count
    finally:
        LlamaDecoderLayer.forward = forward


class Reference:
    """KL(teacher || splice) per token, every splice a fresh nn.Module splice run from its first layer."""

    def __init__(self, pair: DeepPair, text: EvalText, batch_size: int) -> None:
        self.teacher, self.student = load_causal_lm(pair.teacher), load_causal_lm(pair.student)
        self.copied, self.text, self.batch_size = pair.copied, text, batch_size
        self.n = len(pair.copied)
        self.known: dict[frozenset[int], float] = {frozenset(range(self.n)): 0.0}

    @torch.no_grad()
    def kl(self, sets: list[frozenset[int]]) -> list[float]:
        """The base commit's scoring: one round runs the teacher and every new splice over each batch."""
        missing = [s for s in dict.fromkeys(sets) if s not in self.known]
        if missing:
            models = [splice(self.teacher, self.student, self.copied, set(s)) for s in missing]
            sums, tokens = [0.0] * len(missing), 0
            for ids, mask in window_batches(self.text, self.batch_size, CPU):
                target = F.log_softmax(self.teacher(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits, dim=-1)
                tokens += int(mask.sum())
                for i, model in enumerate(models):
                    log_probs = F.log_softmax(model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits, dim=-1)
                    per_token = (target.exp() * (target - log_probs)).sum(-1)
                    sums[i] += float(per_token[mask].sum())
            self.known.update((s, total / tokens) for s, total in zip(missing, sums))
        return [self.known[s] for s in sets]

    def greedy(self) -> list[int]:
        """KLPatch as the base commit ran it: each step the lowest-KL block, the lowest index on a tie."""
        patched: list[int] = []
        while len(patched) < self.n:
            candidates = [b for b in range(self.n) if b not in patched]
            kls = self.kl([frozenset(patched) | {b} for b in candidates])
            patched.append(min(zip(kls, candidates))[1])
        return patched

    def kl_order(self) -> list[int]:
        """--order kl on the base commit: the greedy order, then the first and last curves."""
        greedy = self.greedy()
        for order in (greedy, list(range(self.n)), list(range(self.n))[::-1]):
            self.kl([frozenset(order[:k]) for k in range(self.n + 1)])
        return greedy
