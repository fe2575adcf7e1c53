"""Whole distill runs on CPU: learning, exact resume, torchrun + FSDP2, user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_distill_support import one_thread, pair_with_text  # noqa: F401 - one_thread is an autouse fixture
from transformers import AutoModelForCausalLM, AutoTokenizer

from layersplice.distill import loop
from layersplice.distill.command import distill_command
from layersplice.distill.config import DataError, DistillError
from layersplice.errors import AlignmentError, OutputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return pair_with_text(tmp_path_factory.mktemp("distill"))


def args(pair, out: Path, *extra: str) -> list[str]:
    teacher, student, data = pair
    return ["--teacher", str(teacher), "--student", str(student), "--data", str(data),
            "--out", str(out), "--seq-len", "32", "--batch-size", "8", "--micro-batch-size", "2",
            "--val-tokens", "512", "--lr", "3e-3", "--shuffle-window", "12", *extra]


def run(argv: list[str]):
    result = CliRunner().invoke(distill_command, argv, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_short_cpu_run_lowers_validation_loss_and_writes_a_loadable_student(pair, tmp_path):
    out = tmp_path / "out"
    run(args(pair, out, "--steps", "12", "--eval-every", "6"))
    val = [m["val_loss"] for m in metrics(out) if "val_loss" in m]
    assert [m["step"] for m in metrics(out) if "val_loss" in m] == [0, 6, 12]
    assert val[-1] < val[0] - 0.3
    steps = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 13))
    assert {"lr", "loss", "ce", "kl", "cos", "tokens_per_s", "grad_norm"} <= set(steps[0])

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    assert (out / "student_config.json").read_text() == (pair[1] / "student_config.json").read_text()
    ids = tokenizer("the student layer", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def test_interrupted_and_resumed_run_equals_uninterrupted_run(pair, tmp_path, monkeypatch):
    common = ("--steps", "6", "--save-every", "2", "--eval-every", "3")
    whole = tmp_path / "whole"
    run(args(pair, whole, *common))

    save = loop.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(config, step, *rest):
        save(config, step, *rest)
        if step == 4:
            raise Killed

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run(args(pair, interrupted, *common))
    monkeypatch.setattr(loop, "save_checkpoint", save)
    run(args(pair, interrupted, *common, "--resume"))

    def without_timing(records):
        timing = {"tokens_per_s", "tflops_per_device", "mfu"}
        return [{k: v for k, v in r.items() if k not in timing} for r in records]

    assert without_timing(metrics(interrupted)) == without_timing(metrics(whole))
    final_whole = load_file(whole / "model.safetensors")
    final_resumed = load_file(interrupted / "model.safetensors")
    assert final_whole.keys() == final_resumed.keys()
    for name in final_whole:
        assert torch.equal(final_whole[name], final_resumed[name]), name


DIE_AFTER_STEP_4 = """
import sys
from layersplice.distill import loop
from layersplice.distill.command import distill_command

save = loop.save_checkpoint

def save_then_die(config, step, *rest):
    save(config, step, *rest)
    if step == 4:
        sys.exit(3)

loop.save_checkpoint = save_then_die
distill_command()
"""


def torchrun(entry: list[str], argv: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *entry, *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_interrupted_and_resumed_follows_the_one_process_trajectory(pair, tmp_path):
    common = ("--steps", "6", "--save-every", "2", "--eval-every", "3")
    single = tmp_path / "single"
    run(args(pair, single, *common, "--micro-batch-size", "4"))

    sharded = tmp_path / "sharded"
    script = tmp_path / "die_after_step_4.py"
    script.write_text(DIE_AFTER_STEP_4)
    killed = torchrun([str(script)], args(pair, sharded, *common))
    assert killed.returncode != 0 and not (sharded / "model.safetensors").exists(), killed.stderr[-3000:]
    assert sorted(p.name for p in (sharded / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    resumed = torchrun(["-m", "layersplice.distill.command"], args(pair, sharded, *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    one, two = metrics(single), metrics(sharded)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "ce", "kl", "cos", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    weights_one, weights_two = load_file(single / "model.safetensors"), load_file(sharded / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    # Float noise, grown by six Adam steps: in one process, changing only
    # --micro-batch-size from 4 to 2 already moves single weights by up to 1e-5.
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=3e-5, msg=name)


def test_torchrun_replicated_teacher_gives_the_sharded_teachers_result(pair, tmp_path):
    common = ("--steps", "3", "--save-every", "0", "--eval-every", "3")
    entry = ["-m", "layersplice.distill.command"]
    replicated = torchrun(entry, args(pair, tmp_path / "replicated", *common))
    sharded = torchrun(entry, args(pair, tmp_path / "sharded", *common, "--shard-teacher"))
    assert replicated.returncode == 0 and sharded.returncode == 0, (replicated.stderr + sharded.stderr)[-3000:]
    assert "teacher" in replicated.stderr
    assert "(frozen, whole on each device)" in replicated.stderr
    assert "(frozen, sharded over 2 processes)" in sharded.stderr
    assert "(trained, sharded over 2 processes)" in replicated.stderr

    one, two = metrics(tmp_path / "replicated"), metrics(tmp_path / "sharded")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "ce", "kl", "cos", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
    weights_one = load_file(tmp_path / "replicated" / "model.safetensors")
    weights_two = load_file(tmp_path / "sharded" / "model.safetensors")
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-6, atol=1e-7, msg=name)


def test_torchrun_with_one_process_shards_nothing(pair, tmp_path):
    done = torchrun(["-m", "layersplice.distill.command"],
                    args(pair, tmp_path / "one", "--steps", "1", "--save-every", "0", "--eval-every", "0"), processes=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(trained, whole on each device)" in done.stderr and "(frozen, whole on each device)" in done.stderr


def test_user_errors_say_what_to_change(pair, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DistillError, match="--batch-size 8 is not a multiple of --micro-batch-size 3"):
        run(args(pair, out, "--micro-batch-size", "3"))
    with pytest.raises(DistillError, match="--seq-len 4096 is longer than --teacher's max_position_embeddings 128"):
        run(args(pair, out, "--seq-len", "4096"))
    with pytest.raises(DataError, match="give exactly one data source"):
        run(args(pair, out, "--synthetic-data"))
    teacher, _, data = pair
    with pytest.raises(AlignmentError, match="no student_config.json; make the student with"):
        run(args((teacher, teacher, data), out))

    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not empty; pass --resume"):
        run(args(pair, out))
    with pytest.raises(OutputError, match="holds no checkpoint"):
        run(args(pair, out, "--resume"))


def test_resume_refuses_other_settings(pair, tmp_path):
    out = tmp_path / "out"
    run(args(pair, out, "--steps", "1", "--save-every", "1", "--eval-every", "0"))
    with pytest.raises(DistillError, match=r"holds a run with other settings \(--lr 0.003 -> 0.001\)"):
        run(args(pair, out, "--steps", "1", "--save-every", "1", "--eval-every", "0", "--lr", "1e-3", "--resume"))


def test_module_entry_point_prints_user_errors_as_one_line(pair, tmp_path):
    command = [sys.executable, "-m", "layersplice.distill.command",
               *args(pair, tmp_path / "out", "--micro-batch-size", "3")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --batch-size 8 is not a multiple of --micro-batch-size 3 x 1 processes; change one of them"
    ]
