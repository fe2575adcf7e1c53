"""The three distillation loss terms against plain-torch computations written here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from test_distill_support import make_pair
from transformers import AutoModelForCausalLM

from layersplice.distill.config import DataSpec, DistillConfig
from layersplice.distill.data import Batch
from layersplice.distill.loop import forward_and_loss
from layersplice.distill.losses import LossWeights, aligned_hidden_states
from layersplice.distill.models import load_models
from layersplice.distill.parallel import World
from layersplice.planning.alignment import Alignment, copied_from_rule

SMALL = dict(vocab_size=64, num_hidden_layers=3, num_attention_heads=4)
HIDDEN_STATE_FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, hidden_size=32, intermediate_size=64, num_key_value_heads=2),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, hidden_size=32, intermediate_size=64, num_key_value_heads=2),
    "qwen3": lambda: transformers.Qwen3Config(
        **SMALL, hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=8
    ),
    "mistral": lambda: transformers.MistralConfig(**SMALL, hidden_size=32, intermediate_size=64, num_key_value_heads=2),
    "gemma2": lambda: transformers.Gemma2Config(
        **SMALL, hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=8
    ),
    "phi3": lambda: transformers.Phi3Config(
        **SMALL, hidden_size=32, intermediate_size=64, num_key_value_heads=2, pad_token_id=0
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL, hidden_size=32, intermediate_size=64),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4),
}


@pytest.mark.parametrize("family", sorted(HIDDEN_STATE_FAMILIES))
def test_last_hidden_state_is_the_final_normed_output_and_the_others_are_layer_outputs(family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(HIDDEN_STATE_FAMILIES[family]()).eval()
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    outputs = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in layers]
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        states = model(ids, output_hidden_states=True, use_cache=False).hidden_states
        final_normed = model.get_decoder()(ids, use_cache=False).last_hidden_state
    for hook in hooks:
        hook.remove()
    assert len(states) == len(layers) + 1
    torch.testing.assert_close(states[-1], final_normed)
    for j in range(1, len(layers)):
        torch.testing.assert_close(states[j], outputs[j - 1])
    assert not torch.allclose(states[-1], outputs[-1])


def test_aligned_pairs_follow_the_reference_and_end_with_the_final_normed_states():
    alignment = Alignment(copied_from_rule(36, 1, 2, 2), 36)
    pairs = dict(aligned_hidden_states(alignment))
    assert pairs == {0: 0, **{i: 2 * i for i in range(1, 18)}, 18: 35, 19: 36}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    teacher_dir, student_dir = make_pair(tmp_path_factory.mktemp("pair"))
    config = dataclasses.replace(_config(), teacher=teacher_dir, student=student_dir)
    loaded = load_models(config, World(0, 1, torch.device("cpu")))
    # Perturb the student so that every term is well away from zero.
    with torch.no_grad():
        for p in loaded.student.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return loaded


def _config(**options) -> DistillConfig:
    unused = Path("unused")
    return DistillConfig(teacher=unused, student=unused, out=unused,
                         data=DataSpec(synthetic=True, seq_len=12), **options)


def _padded_batch(vocab_size: int) -> Batch:
    ids = torch.randint(0, vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 3:] = False
    return Batch(ids, mask, padded=True)


def test_each_loss_term_equals_a_plain_torch_computation(models):
    weights = LossWeights(kl=0.3, temperature=2.0, cos=1.5)
    config = _config(loss=weights)
    batch = _padded_batch(models.teacher.config.vocab_size)
    terms = forward_and_loss(models, batch, config, World(0, 1, torch.device("cpu")))

    attention = batch.mask.long()
    with torch.no_grad():
        t = models.teacher(batch.ids, attention_mask=attention, output_hidden_states=True)
        s = models.student(batch.ids, attention_mask=attention, output_hidden_states=True)
    real = batch.mask

    log_probs = torch.log_softmax(s.logits[:, :-1], -1)
    nll = -log_probs.gather(-1, batch.ids[:, 1:, None])[..., 0]
    target_real = real[:, 1:] & real[:, :-1]
    expected_ce = nll[target_real].mean()

    T = weights.temperature
    kl_sum = F.kl_div(torch.log_softmax(s.logits[real] / T, -1), torch.softmax(t.logits[real] / T, -1),
                      reduction="sum")
    expected_kl = kl_sum / real.sum()

    pairs = [(0, 0), (1, 2), (2, 4), (3, 5), (4, 6)]  # 6-layer teacher, 1/2/2 student; last = final normed
    expected_cos = torch.stack([
        (1 - F.cosine_similarity(s.hidden_states[a][real], t.hidden_states[b][real], dim=-1)).mean()
        for a, b in pairs
    ]).mean()

    torch.testing.assert_close(terms.ce, expected_ce)
    torch.testing.assert_close(terms.kl, expected_kl)
    torch.testing.assert_close(terms.cos, expected_cos)
    expected_total = expected_ce + 0.3 * 4.0 * expected_kl + 1.5 * expected_cos
    torch.testing.assert_close(terms.total.detach(), expected_total)
    assert min(terms.ce, terms.kl, terms.cos) > 1e-4


def test_padding_leaves_every_term_unchanged(models):
    config = _config()
    world = World(0, 1, torch.device("cpu"))
    batch = _padded_batch(models.teacher.config.vocab_size)
    row = batch.ids[1:2, :7]
    alone = forward_and_loss(models, Batch(row, torch.ones_like(row, dtype=torch.bool), False), config, world)
    padded = forward_and_loss(models, Batch(batch.ids[1:2], batch.mask[1:2], True), config, world)
    for name in ("ce", "kl", "cos"):
        torch.testing.assert_close(getattr(padded, name), getattr(alone, name))
