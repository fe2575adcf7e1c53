"""Chunked CE and KL against the full logits that transformers' own forward computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from layersplice.distill.command import distill_command
from layersplice.distill.chunked import LogitForm, chunked_logit_losses
from layersplice.distill.heads import head_of, logit_form
from layersplice.distill.losses import cross_entropy_loss, kl_loss

VOCAB, HIDDEN = 97, 32
SMALL = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=False),
    "qwen3_tied": lambda: transformers.Qwen3Config(**SMALL, head_dim=8, tie_word_embeddings=True),
    # A low cap, so that tanh bends the logits of these small random models.
    "gemma2_softcapped": lambda: transformers.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=0.8),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=4),
}
TEMPERATURE = 1.7


def _model(family: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]()).float()
    with torch.no_grad():  # spread the logits so that every term and gradient is far from zero
        model.get_output_embeddings().weight.mul_(8)
    return model


def _logits_by_transformers(model, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own logits, with its head fed `hidden` in place of its final states."""
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _module, _args: (hidden,))
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        hook.remove()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 8:] = False
    mask[2, 4:] = False
    return ids, mask


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).detach().norm() / reference.detach().norm())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kl_scale", [0.0, 0.7])
def test_chunked_losses_and_gradients_equal_the_materialized_ones(family, kl_scale):
    student, teacher = _model(family, 0), _model(family, 1)
    ids, mask = _batch()
    generator = torch.Generator().manual_seed(4)
    s_hidden = torch.randn(3, 12, HIDDEN, generator=generator).requires_grad_()
    t_hidden = torch.randn(3, 12, HIDDEN, generator=generator).requires_grad_()
    s_head, t_head = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    inputs = [s_hidden, s_head, t_hidden, t_head]

    s_logits = _logits_by_transformers(student, ids, s_hidden)
    t_logits = _logits_by_transformers(teacher, ids, t_hidden)
    ce = cross_entropy_loss(s_logits, ids, mask)
    kl = kl_loss(s_logits, t_logits, mask, TEMPERATURE)
    expected = torch.autograd.grad(ce + kl_scale * kl, inputs, allow_unused=True)

    forms = logit_form(student), logit_form(teacher)
    assert all(isinstance(form, LogitForm) for form in forms)
    losses = chunked_logit_losses(head_of(student, forms[0]), s_hidden, head_of(teacher, forms[1]), t_hidden,
                                  ids, mask, TEMPERATURE, kl_scale, chunk=5)
    got = torch.autograd.grad(losses.total, inputs, allow_unused=True)

    assert _relative(losses.ce, ce) <= 1e-5
    assert _relative(losses.kl, kl) <= 1e-5
    assert min(float(ce.detach()), float(kl.detach())) > 1e-2
    for name, ours, reference in zip(("student hidden", "student head", "teacher hidden", "teacher head"),
                                     got, expected):
        if reference is None or not reference.any():  # no KL: the teacher gets no gradient
            assert kl_scale == 0 and (ours is None or not ours.any()), name
            continue
        assert _relative(ours, reference) <= 1e-5, name


def test_soft_capping_is_read_from_the_config_and_bends_the_logits():
    form = logit_form(_model("gemma2_softcapped", 0))
    assert form == LogitForm(scale=1.0, softcap=0.8)
    capped, _ = form.apply(torch.tensor([-100.0, 0.0, 100.0]))
    torch.testing.assert_close(capped, torch.tensor([-0.8, 0.0, 0.8]))


def test_a_head_that_is_not_a_linear_map_is_refused_with_a_reason():
    model = _model("llama", 0)
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(HIDDEN, VOCAB, bias=False))
    assert isinstance(logit_form(model), str)
    plain = _model("llama", 0)  # a linear head, but logits changed in a way no config names
    original = plain.forward

    def doubled(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    plain.forward = doubled
    assert "not a linear map" in logit_form(plain)


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _fixture_run(out: Path, *extra: str) -> list[dict]:
    argv = ["--teacher", str(FIXTURES / "tiny-teacher"), "--student", str(FIXTURES / "tiny-student"),
            "--out", str(out), "--synthetic-data", "--seq-len", "64", "--batch-size", "4",
            "--micro-batch-size", "2", "--steps", "50", "--val-tokens", "0", "--eval-every", "0",
            "--save-every", "0", "--temperature", "2", "--lr", "1e-3", "--device", "cpu", *extra]
    result = CliRunner().invoke(distill_command, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fifty_steps_on_the_fixture_pair_follow_the_full_logit_loss_curve(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = _fixture_run(tmp_path / "full", "--loss-chunk-tokens", "0")
        chunked = _fixture_run(tmp_path / "chunked", "--loss-chunk-tokens", "48")  # 3 chunks a micro-batch
    finally:
        torch.set_num_threads(threads)
    assert len(full) == len(chunked) == 50
    assert full[-1]["loss"] < 0.9 * full[0]["loss"]  # it trains: the curve is not flat
    for a, b in zip(full, chunked, strict=True):
        for key in ("loss", "ce", "kl", "cos"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
