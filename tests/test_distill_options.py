"""--compile, --activation-checkpointing and --peak-tflops: each runs and leaves the losses alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from click.testing import CliRunner
from eval_support import one_torch_thread  # noqa: F401 - autouse: one thread, as torchrun's workers run
from safetensors.torch import load_file
from test_distill_support import make_pair
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import layersplice.distill.models
from layersplice.distill.command import distill_command


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def run(pair, out: Path, *extra: str) -> tuple[list[dict], str]:
    teacher, student = pair
    argv = ["--teacher", str(teacher), "--student", str(student), "--out", str(out), "--synthetic-data",
            "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "2", "--steps", "4",
            "--val-tokens", "0", "--eval-every", "0", "--save-every", "0", "--lr", "3e-3", "--device", "cpu",
            *extra]
    result = CliRunner().invoke(distill_command, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, result.output


def assert_same_run(a: list[dict], b: list[dict], rel: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "ce", "kl", "cos", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=rel), (x["step"], key)


def test_activation_checkpointing_gives_the_same_losses_and_weights(pair, tmp_path, monkeypatch):
    plain, _ = run(pair, tmp_path / "plain")
    calls = []

    def counted_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted_checkpoint)
    checkpointed, _ = run(pair, tmp_path / "checkpointed", "--activation-checkpointing")
    student_layers = 4  # make_pair's 6-layer teacher, 1/2/2: layers 0, 2, 4, 5
    assert len(calls) == 4 * 2 * student_layers  # every student layer of every micro-batch, no teacher layer
    assert_same_run(plain, checkpointed, rel=1e-5)
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "checkpointed" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_layers_give_the_same_losses(pair, tmp_path):
    plain, _ = run(pair, tmp_path / "plain")
    torch._dynamo.reset()
    counters.clear()
    compiled, _ = run(pair, tmp_path / "compiled", "--compile")
    assert counters["stats"]["unique_graphs"] >= 2  # the teacher's layers and the student's
    # Inductor fuses and reorders float operations: equal up to float noise.
    assert_same_run(plain, compiled, rel=1e-4)


def test_metrics_give_tflops_and_mfu_only_against_a_peak(pair, tmp_path):
    records, output = run(pair, tmp_path / "no-peak")
    assert "expects about" in output and "tokens a step" in output and "no known peak" in output
    assert all(r["tflops_per_device"] > 0 and "mfu" not in r for r in records)
    records, _ = run(pair, tmp_path / "peak", "--peak-tflops", "0.5")
    for r in records:
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.5)


def test_a_head_the_chunked_loss_cannot_read_falls_back_to_full_logits_and_says_so_once(
        pair, tmp_path, monkeypatch):
    full, _ = run(pair, tmp_path / "full", "--loss-chunk-tokens", "0")
    monkeypatch.setattr(layersplice.distill.models, "logit_form", lambda model: "its output layer is Strange, not a linear map")
    fallen_back, output = run(pair, tmp_path / "fallback")
    assert output.count("not a linear map; CE and KL use full") == 1
    assert [r["loss"] for r in fallen_back] == [r["loss"] for r in full]  # the very same computation
