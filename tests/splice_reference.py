"""The test oracle: an in-memory splice of loaded teacher and student nn.Modules.

Written from METHOD.md §4 and §5 alone and independent of layersplice: it moves
whole transformers modules (decoder layers, embeddings, final norm, head)
instead of tensors on disk, so a misunderstanding of tensor names or config
keys in layersplice cannot be shared by the oracle.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

LayerSource = tuple[PreTrainedModel, int]


@dataclass(frozen=True)
class Family:
    """Where a model keeps the modules a splice moves.

    Paths may be dotted; `backbone` "" is the model itself. `embeddings`,
    `layers` and `final_norm` are inside the backbone, `heads` inside the
    model. An encoder has no final norm: its heads (pooler, MLM head) read the
    last hidden state, so they travel with the last block instead.
    """

    backbone: str
    embeddings: tuple[str, ...]
    layers: str
    final_norm: str | None
    heads: tuple[str, ...] = ("lm_head",)


_DECODER = Family("model", ("embed_tokens",), "layers", "norm")
FAMILIES = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma3_text": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "phi3": _DECODER,
    "mixtral": _DECODER,
    "qwen3_moe": _DECODER,
    "gpt_neox": Family("gpt_neox", ("embed_in",), "layers", "final_layer_norm"),
    # GPT-2's learned position embeddings travel with the token embeddings.
    "gpt2": Family("transformer", ("wte", "wpe"), "h", "ln_f"),
}
# Encoders differ by class, not by model_type: a bare BertModel has a pooler,
# BertForMaskedLM an MLM head and no pooler.
CLASS_FAMILIES = {
    "BertModel": Family("", ("embeddings",), "encoder.layer", None, ("pooler",)),
    "BertForMaskedLM": Family("bert", ("embeddings",), "encoder.layer", None, ("cls",)),
    "DistilBertForMaskedLM": Family(
        "distilbert", ("embeddings",), "transformer.layer", None,
        ("vocab_transform", "vocab_layer_norm", "vocab_projector"),
    ),
}


def family_of(model: PreTrainedModel) -> Family:
    return CLASS_FAMILIES.get(type(model).__name__) or FAMILIES[model.config.model_type]


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in filter(None, path.split(".")):
        root = getattr(root, part)
    return root


def set_module(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent), name, module)


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
    family = family_of(model)
    return len(get_module(get_module(model, family.backbone), family.layers))


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
    layers = [(model, i, copy.deepcopy) for model, i in sources]
    return assemble_across(teacher, embeddings_from, layers, head_from, copy.deepcopy)


def assemble_across(
    model_from: PreTrainedModel,
    embeddings_from: PreTrainedModel,
    layers: list[tuple[PreTrainedModel, int, Callable[[torch.nn.Module], torch.nn.Module]]],
    head_from: PreTrainedModel,
    convert_head: Callable[[PreTrainedModel], dict[str, torch.nn.Module]] | Callable[[torch.nn.Module], torch.nn.Module],
) -> PreTrainedModel:
    """A fresh model of `model_from`'s class and config with the given modules.

    `layers` are (model, layer index, how to turn that layer into one of the
    output's family: a deep copy within a family). `convert_head` turns the
    head model's heads into the output's: a deep copy within a family, else a
    function of the head model returning {head path: module}.
    """
    family = family_of(model_from)
    config = copy.deepcopy(model_from.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [model.config.layer_types[i] for model, i, _ in layers]
    # Separate modules below; a tie would re-point the head at the embeddings.
    config.tie_word_embeddings = False
    spliced = type(model_from)(config).eval()

    backbone = get_module(spliced, family.backbone)
    moved = [
        convert(get_module(get_module(model, family_of(model).backbone), family_of(model).layers)[i])
        for model, i, convert in layers
    ]
    set_module(backbone, family.layers, torch.nn.ModuleList(moved))
    source_backbone = get_module(embeddings_from, family.backbone)
    for name in family.embeddings:
        set_module(backbone, name, copy.deepcopy(get_module(source_backbone, name)))
    if type(head_from) is type(model_from):
        if family.final_norm is not None:
            norm = get_module(get_module(head_from, family.backbone), family.final_norm)
            set_module(backbone, family.final_norm, copy.deepcopy(norm))
        heads = {name: convert_head(get_module(head_from, name)) for name in family.heads}
    else:
        heads = convert_head(head_from)
    for name, module in heads.items():
        set_module(spliced, name, module)
    return spliced


# --- Splices across two families ------------------------------------------
# Module correspondences written from each family's modeling code. Within a
# family a module is moved as it is; across families the output family's
# module is rebuilt from the other family's (and split or fused where one
# family fuses projections the other keeps apart).

LayerConversion = Callable[[torch.nn.Module, PreTrainedModel], torch.nn.Module]
HeadConversion = Callable[[PreTrainedModel, PreTrainedModel], dict[str, torch.nn.Module]]

BERT_PATHS_OF_DISTILBERT_LAYER = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}
BERT_PATHS_OF_DISTILBERT_HEAD = {
    "vocab_transform": "cls.predictions.transform.dense",
    "vocab_layer_norm": "cls.predictions.transform.LayerNorm",
    "vocab_projector": "cls.predictions.decoder",
}


def _rebuilt(template: torch.nn.Module, parts: dict[str, torch.nn.Module | torch.nn.Parameter]) -> torch.nn.Module:
    """A copy of `template` with its submodules (or parameters) at the given paths
    replaced; no parameter of the template may remain."""
    out = copy.deepcopy(template)
    for path, part in parts.items():
        set_module(out, path, part)
    replaced = {
        id(p) for part in parts.values()
        for p in (part.parameters() if isinstance(part, torch.nn.Module) else [part])
    }
    left = [name for name, p in out.named_parameters() if id(p) not in replaced]
    assert not left, f"the conversion leaves {left} of the template in place"
    return out


def _moved(source: torch.nn.Module, paths: dict[str, str]) -> dict[str, torch.nn.Module]:
    return {dst: copy.deepcopy(get_module(source, src)) for src, dst in paths.items()}


def _first_layer(model: PreTrainedModel) -> torch.nn.Module:
    family = family_of(model)
    return get_module(get_module(model, family.backbone), family.layers)[0]


def bert_layer_from_distilbert(layer: torch.nn.Module, out: PreTrainedModel) -> torch.nn.Module:
    return _rebuilt(_first_layer(out), _moved(layer, BERT_PATHS_OF_DISTILBERT_LAYER))


def distilbert_layer_from_bert(layer: torch.nn.Module, out: PreTrainedModel) -> torch.nn.Module:
    paths = {bert: distil for distil, bert in BERT_PATHS_OF_DISTILBERT_LAYER.items()}
    return _rebuilt(_first_layer(out), _moved(layer, paths))


def bert_heads_from_distilbert(head: PreTrainedModel, out: PreTrainedModel) -> dict[str, torch.nn.Module]:
    """BERT's MLM head keeps the decoder bias twice (predictions.bias and decoder.bias)."""
    parts = {path[len("cls."):]: module for path, module in _moved(head, BERT_PATHS_OF_DISTILBERT_HEAD).items()}
    parts["predictions.bias"] = copy.deepcopy(head.vocab_projector.bias)
    return {"cls": _rebuilt(out.cls, parts)}


def distilbert_heads_from_bert(head: PreTrainedModel, out: PreTrainedModel) -> dict[str, torch.nn.Module]:
    return _moved(head, {bert: distil for distil, bert in BERT_PATHS_OF_DISTILBERT_HEAD.items()})


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(weight.detach().clone())
    return layer


def _projection_rows(config) -> tuple[int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim, config.intermediate_size


def llama_layer_from_phi3(layer: torch.nn.Module, out: PreTrainedModel) -> torch.nn.Module:
    """Phi-3 computes q, k, v = split(qkv_proj(x)) and gate, up = chunk(gate_up_proj(x), 2)."""
    q, kv, inter = _projection_rows(out.config)
    qkv, gate_up = layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight
    parts = {
        "self_attn.q_proj": _linear(qkv[:q]),
        "self_attn.k_proj": _linear(qkv[q : q + kv]),
        "self_attn.v_proj": _linear(qkv[q + kv :]),
        "mlp.gate_proj": _linear(gate_up[:inter]),
        "mlp.up_proj": _linear(gate_up[inter:]),
    }
    same = ("self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    return _rebuilt(_first_layer(out), {**parts, **_moved(layer, {p: p for p in same})})


def phi3_layer_from_llama(layer: torch.nn.Module, out: PreTrainedModel) -> torch.nn.Module:
    attn, mlp = layer.self_attn, layer.mlp
    parts = {
        "self_attn.qkv_proj": _linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
        "mlp.gate_up_proj": _linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
    }
    same = ("self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    return _rebuilt(_first_layer(out), {**parts, **_moved(layer, {p: p for p in same})})


def decoder_heads(head: PreTrainedModel, out: PreTrainedModel) -> dict[str, torch.nn.Module]:
    return _moved(head, {"model.norm": "model.norm", "lm_head": "lm_head"})


# (class of the moved module's model, class of the output model) -> conversions
CONVERSIONS: dict[tuple[str, str], tuple[LayerConversion, HeadConversion]] = {
    ("DistilBertForMaskedLM", "BertForMaskedLM"): (bert_layer_from_distilbert, bert_heads_from_distilbert),
    ("BertForMaskedLM", "DistilBertForMaskedLM"): (distilbert_layer_from_bert, distilbert_heads_from_bert),
    ("Phi3ForCausalLM", "LlamaForCausalLM"): (llama_layer_from_phi3, decoder_heads),
    ("LlamaForCausalLM", "Phi3ForCausalLM"): (phi3_layer_from_llama, decoder_heads),
}


def splice_across(
    teacher: PreTrainedModel, student: PreTrainedModel, copied: tuple[int, ...], patched: set[int]
) -> PreTrainedModel:
    """METHOD.md §4's general rule for a teacher and a student of two families: the
    output is a model of the family (class and config) of the embeddings' model."""
    embeddings_from = teacher if 0 in patched else student
    head_from = teacher if len(copied) - 1 in patched else student

    def conversion(model: PreTrainedModel) -> tuple[LayerConversion, HeadConversion]:
        return CONVERSIONS[(type(model).__name__, type(embeddings_from).__name__)]

    layers = [
        (model, i, copy.deepcopy if type(model) is type(embeddings_from) else functools.partial(conversion(model)[0], out=embeddings_from))
        for model, i in layer_sources(teacher, student, copied, patched)
    ]
    convert_head = (
        copy.deepcopy if type(head_from) is type(embeddings_from)
        else functools.partial(conversion(head_from)[1], out=embeddings_from)
    )
    return assemble_across(embeddings_from, embeddings_from, layers, head_from, convert_head)
