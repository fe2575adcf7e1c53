"""Tiny random teachers and students of the families beyond the core decoders:
mixture-of-experts, Gemma, Phi-3, encoders, and pairs across two families.

Every model comes from a transformers config class with random weights; a
student is a model of its own config with fewer layers, each layer of the kind
(dense or experts, sliding or full attention) of the teacher layer it stands
for, and different random weights.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    DistilBertConfig,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MixtralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3MoeConfig,
)

VOCAB = 128
HIDDEN = 32
_DECODER = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_BERT = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64, initializer_range=0.1,
)


@dataclass(frozen=True)
class Kind:
    """How to make a model of one family: its config (by layer count) and Auto class."""

    config: Callable[[int], PretrainedConfig]
    auto: type
    # Save experts as transformers holds them in memory (one fused tensor per
    # layer) instead of the per-expert tensors save_pretrained writes.
    fused_experts: bool = False


KINDS: dict[str, Kind] = {
    "mixtral": Kind(lambda n: MixtralConfig(**_DECODER, num_hidden_layers=n, num_local_experts=3, num_experts_per_tok=2), AutoModelForCausalLM),
    "mixtral-fused": Kind(
        lambda n: MixtralConfig(**_DECODER, num_hidden_layers=n, num_local_experts=3, num_experts_per_tok=2),
        AutoModelForCausalLM, fused_experts=True,
    ),
    # Experts in layers 1 and 5 only: (i + 1) % 2 == 0, except the listed layer 3.
    "qwen3_moe": Kind(
        lambda n: Qwen3MoeConfig(
            **_DECODER, num_hidden_layers=n, head_dim=8, num_experts=3, num_experts_per_tok=2,
            moe_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[3],
        ),
        AutoModelForCausalLM,
    ),
    "gemma": Kind(lambda n: GemmaConfig(**_DECODER, num_hidden_layers=n, head_dim=8), AutoModelForCausalLM),
    "gemma2": Kind(
        lambda n: Gemma2Config(**_DECODER, num_hidden_layers=n, head_dim=8, sliding_window=4), AutoModelForCausalLM
    ),
    # Same norm epsilon as the Llama below, so the two families pair.
    "phi3": Kind(lambda n: Phi3Config(**_DECODER, num_hidden_layers=n, rms_norm_eps=1e-6), AutoModelForCausalLM),
    "llama": Kind(
        lambda n: LlamaConfig(**_DECODER, num_hidden_layers=n, rms_norm_eps=1e-6, tie_word_embeddings=False),
        AutoModelForCausalLM,
    ),
    "bert": Kind(lambda n: BertConfig(**_BERT, num_hidden_layers=n), AutoModel),
    "bert-mlm": Kind(lambda n: BertConfig(**_BERT, num_hidden_layers=n), AutoModelForMaskedLM),
    "distilbert": Kind(
        lambda n: DistilBertConfig(
            vocab_size=VOCAB, dim=HIDDEN, n_layers=n, n_heads=4, hidden_dim=64,
            max_position_embeddings=64, initializer_range=0.1,
        ),
        AutoModelForMaskedLM,
    ),
}


def load_model(directory: Path) -> PreTrainedModel:
    """A saved checkpoint by the Auto class its config names: fp32, eager attention, eval mode."""
    architecture = json.loads((directory / "config.json").read_text())["architectures"][0]
    auto = (
        AutoModelForCausalLM if architecture.endswith("ForCausalLM")
        else AutoModelForMaskedLM if architecture.endswith("ForMaskedLM")
        else AutoModel
    )
    return auto.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def outputs(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits, or for a bare encoder its last hidden states followed by the pooler output."""
    out = model(input_ids=input_ids) if "Bert" in type(model).__name__ else model(input_ids=input_ids, use_cache=False)
    if hasattr(out, "logits"):
        return out.logits
    pooled = out.pooler_output[:, None, :] if out.pooler_output is not None else out.last_hidden_state[:, :0]
    return torch.cat([out.last_hidden_state, pooled], dim=1)


def student_config(teacher: PretrainedConfig, copied: tuple[int, ...]) -> PretrainedConfig:
    """The teacher's config with a layer per copied teacher layer, each of that layer's kind."""
    config = copy.deepcopy(teacher)
    config.num_hidden_layers = len(copied)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [teacher.layer_types[i] for i in copied]
    if hasattr(config, "mlp_only_layers"):
        step = teacher.decoder_sparse_step
        dense = [i for i in range(teacher.num_hidden_layers) if i in teacher.mlp_only_layers or (i + 1) % step]
        config.decoder_sparse_step = 1
        config.mlp_only_layers = [j for j, i in enumerate(copied) if i in dense]
    return config


def save_random(kind: Kind, config: PretrainedConfig, seed: int, directory: Path) -> None:
    torch.manual_seed(seed)
    model = kind.auto.from_config(config)
    model.save_pretrained(directory)
    if kind.fused_experts:
        (directory / "model.safetensors").unlink()
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def family_pairs(root: Path, pair_type: type) -> Callable[..., object]:
    """Get (and cache) a teacher of `teacher_kind` with `n_teacher` layers and a
    student of `student_kind` (default: the same) of the copied teacher layers,
    with a student_config.json unless `student_config_file` is false (a pair
    distilled by others has none). Pairs are conftest.Pair objects (`pair_type`)."""
    dirs: dict[tuple, Path] = {}
    models: dict[Path, PreTrainedModel] = {}

    def saved(kind_name: str, config: PretrainedConfig, key: tuple) -> Path:
        if key not in dirs:
            directory = root / "-".join(map(str, key)).replace(" ", "").replace(",", "_")
            save_random(KINDS[kind_name], config, zlib.crc32(repr(key).encode()), directory)
            dirs[key] = directory
            models[directory] = load_model(directory)
        return dirs[key]

    def get(
        teacher_kind: str, copied: tuple[int, ...], n_teacher: int = 6, student_kind: str | None = None,
        student_config_file: bool = True,
    ):
        teacher_config = KINDS[teacher_kind].config(n_teacher)
        teacher = saved(teacher_kind, teacher_config, ("teacher", teacher_kind, n_teacher))
        student_kind = student_kind or teacher_kind
        if student_kind == teacher_kind:
            config = student_config(teacher_config, copied)
        else:
            config = KINDS[student_kind].config(len(copied))
        key = ("student", student_kind, teacher_kind, n_teacher, copied, student_config_file)
        student = saved(student_kind, config, key)
        if student_config_file:
            pruned = [i for i in range(n_teacher) if i not in copied]
            (student / "student_config.json").write_text(
                json.dumps({"pruned_teacher_layers": pruned, "copied_teacher_layers": list(copied)})
            )
        return pair_type(teacher, student, copied, models[teacher], models[student])

    return get
