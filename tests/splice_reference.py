"""The test oracle: an in-memory splice of loaded teacher and student nn.Modules.

Written from METHOD.md §4 and §5 alone and independent of layersplice: it moves
whole transformers modules (decoder layers, embeddings, final norm, head)
instead of tensors on disk, so a misunderstanding of tensor names or config
keys in layersplice cannot be shared by the oracle.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

LayerSource = tuple[PreTrainedModel, int]


@dataclass(frozen=True)
class Family:
    """Where a causal LM keeps the modules a splice moves."""

    backbone: str
    embeddings: tuple[str, ...]
    layers: str
    final_norm: str
    head: str = "lm_head"


_DECODER = Family("model", ("embed_tokens",), "layers", "norm")
FAMILIES = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma3_text": _DECODER,
    "gpt_neox": Family("gpt_neox", ("embed_in",), "layers", "final_layer_norm"),
    # GPT-2's learned position embeddings travel with the token embeddings.
    "gpt2": Family("transformer", ("wte", "wpe"), "h", "ln_f"),
}


def load_causal_lm(directory: Path) -> PreTrainedModel:
    """A saved checkpoint as the tests run it: fp32, eager attention, eval mode."""
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@torch.no_grad()
def logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    # Without a cache the copied layers' own layer_idx never matters.
    return model(input_ids=input_ids, use_cache=False).logits


def n_layers(model: PreTrainedModel) -> int:
    family = FAMILIES[model.config.model_type]
    return len(getattr(getattr(model, family.backbone), family.layers))


def blocks(copied: tuple[int, ...], n_teacher: int) -> list[range]:
    """Teacher layers that student layer i stands for: [copied[i], copied[i+1]), last to N."""
    ends = list(copied[1:]) + [n_teacher]
    return [range(start, end) for start, end in zip(copied, ends)]


def patch_order(n_student: int, order: str) -> list[int]:
    """Blocks in the order they are patched: from the end ('last') or the start ('first')."""
    forward = list(range(n_student))
    return forward[::-1] if order == "last" else forward


def kept_blocks_patched(n_keep: int, n_student: int, order: str) -> set[int]:
    """The blocks `--keep n_keep` patches: n_keep blocks at the far end from patching stay student."""
    return set(patch_order(n_student, order)[: n_student - n_keep])


def patch_order_prefixes(n_student: int, order: str) -> list[set[int]]:
    """Every set of blocks that patches a run from the patched end, the empty set included."""
    order_list = patch_order(n_student, order)
    return [set(order_list[:count]) for count in range(n_student + 1)]


def layer_sources(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    copied: tuple[int, ...],
    patched: set[int],
) -> list[LayerSource]:
    """Each output layer's (model, index): a patched block's teacher layers, else the student layer."""
    sources: list[LayerSource] = []
    for i, block in enumerate(blocks(copied, n_layers(teacher))):
        if i in patched:
            sources.extend((teacher, j) for j in block)
        else:
            sources.append((student, i))
    return sources


def splice(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    copied: tuple[int, ...],
    patched: set[int],
) -> PreTrainedModel:
    """METHOD.md §4's general rule for any set of patched blocks."""
    last_block = len(copied) - 1
    return assemble(
        teacher,
        layer_sources(teacher, student, copied, patched),
        embeddings_from=teacher if 0 in patched else student,
        head_from=teacher if last_block in patched else student,
    )


def reference_patch(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    copied: tuple[int, ...],
    k: int,
    order: str,
) -> PreTrainedModel:
    """The reference's `k` (multi-layer blocks patched), by the slicing formula of METHOD.md §4.

    Embeddings and head follow layersplice's general rule at the two edges where
    the reference differs on purpose (nothing patched, everything patched).
    """
    n_teacher, n_student = n_layers(teacher), len(copied)
    multi = [len(block) > 1 for block in blocks(copied, n_teacher)]
    k = min(k, sum(multi))
    if order == "last":
        s = min(s for s in range(n_student + 1) if sum(multi[s:]) == k)
        start = copied[s] if s < n_student else n_teacher
        sources = [(student, i) for i in range(s)] + [(teacher, j) for j in range(start, n_teacher)]
        embeddings_from = student if s > 0 else teacher
        head_from = teacher if s < n_student else student
    else:
        s = max(s for s in range(n_student + 1) if sum(multi[:s]) == k)
        end = copied[s] if s < n_student else n_teacher
        sources = [(teacher, j) for j in range(end)] + [(student, i) for i in range(s, n_student)]
        embeddings_from = teacher if s > 0 else student
        head_from = student if s < n_student else teacher
    return assemble(teacher, sources, embeddings_from, head_from)


def assemble(
    teacher: PreTrainedModel,
    sources: list[LayerSource],
    embeddings_from: PreTrainedModel,
    head_from: PreTrainedModel,
) -> PreTrainedModel:
    """A fresh model of the teacher's class holding deep copies of the chosen modules.

    Each copied layer keeps its own attention module (window included); the
    config's per-layer list takes each layer's entry from the model it came from,
    because the backbone picks masks and rotary tables by that list.
    """
    family = FAMILIES[teacher.config.model_type]
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(sources)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [model.config.layer_types[i] for model, i in sources]
    # Separate modules below; a tie would re-point the head at the embeddings.
    config.tie_word_embeddings = False
    spliced = type(teacher)(config).eval()

    backbone = getattr(spliced, family.backbone)
    layers = [getattr(getattr(model, family.backbone), family.layers)[i] for model, i in sources]
    setattr(backbone, family.layers, torch.nn.ModuleList(copy.deepcopy(layer) for layer in layers))
    for name in family.embeddings:
        setattr(backbone, name, copy.deepcopy(getattr(getattr(embeddings_from, family.backbone), name)))
    setattr(backbone, family.final_norm, copy.deepcopy(getattr(getattr(head_from, family.backbone), family.final_norm)))
    setattr(spliced, family.head, copy.deepcopy(getattr(head_from, family.head)))
    return spliced
