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
from test_distill_support import (  # noqa: F401 - one_thread is an autouse fixture
    one_thread, pair_with_text, sentences, write_jsonl,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from layersplice.cli.main import cli
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


def assert_same_losses(one: list[dict], two: list[dict], **tolerance) -> None:
    """The same records, step for step, with every loss term equal within `tolerance` (pytest.approx's)."""
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "ce", "kl", "cos", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], **tolerance), (a["step"], key)


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


class Killed(Exception):
    pass


def killed_after_checkpoint(monkeypatch, step: int, argv: list[str]) -> None:
    """Run `argv` and stop it right after its checkpoint at `step`, as a killed run stops."""
    save = loop.save_checkpoint

    def save_then_die(config, at, *rest):
        save(config, at, *rest)
        if at == step:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            run(argv)


def test_interrupted_and_resumed_run_equals_uninterrupted_run(pair, tmp_path, monkeypatch):
    common = ("--steps", "6", "--save-every", "2", "--eval-every", "3")
    whole = tmp_path / "whole"
    run(args(pair, whole, *common))

    interrupted = tmp_path / "interrupted"
    killed_after_checkpoint(monkeypatch, 4, args(pair, interrupted, *common))
    run(args(pair, interrupted, *common, "--resume"))

    assert without_timing(metrics(interrupted)) == without_timing(metrics(whole))
    final_whole = load_file(whole / "model.safetensors")
    final_resumed = load_file(interrupted / "model.safetensors")
    assert final_whole.keys() == final_resumed.keys()
    for name in final_whole:
        assert torch.equal(final_whole[name], final_resumed[name]), name


DIE_AFTER_STEP_4 = """
import sys
from layersplice.cli.main import cli
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

    assert_same_losses(metrics(single), metrics(sharded), rel=1e-4, abs=1e-6)
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

    assert_same_losses(metrics(tmp_path / "replicated"), metrics(tmp_path / "sharded"), rel=1e-6)
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


def test_resume_refuses_other_settings(pair, tmp_path, monkeypatch):
    out = tmp_path / "out"
    common = ("--steps", "2", "--save-every", "1", "--eval-every", "0")
    killed_after_checkpoint(monkeypatch, 1, args(pair, out, *common))
    with pytest.raises(DistillError, match=r"holds a run with other settings \(--lr 0.003 -> 0.001\)"):
        run(args(pair, out, *common, "--lr", "1e-3", "--resume"))


def test_module_entry_point_prints_user_errors_as_one_line(pair, tmp_path):
    command = [sys.executable, "-m", "layersplice.distill.command",
               *args(pair, tmp_path / "out", "--micro-batch-size", "3")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --batch-size 8 is not a multiple of --micro-batch-size 3 x 1 processes; change one of them"
    ]


def without_timing(records: list[dict]) -> list[dict]:
    timing = {"tokens_per_s", "tflops_per_device", "mfu", "step_s", "data_wait_s"}
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


@pytest.fixture(scope="module")
def small_corpus(pair, tmp_path_factory):
    """Text of a few blocks an epoch, and its `layersplice tokenize` output (seq 32, 128 tokens held out)."""
    teacher = pair[0]
    root = tmp_path_factory.mktemp("small")
    text = write_jsonl(root / "small.jsonl", sentences(14, seed=9))
    tokens = root / "tokens"
    result = CliRunner().invoke(cli, ["tokenize", "--teacher", str(teacher), "--data", str(text), "--out", str(tokens),
                                      "--seq-len", "32", "--val-tokens", "128", "--num-proc", "2"])
    assert result.exit_code == 0, result.output
    blocks = json.loads((tokens / "layersplice.json").read_text())["train"]["blocks"]
    return text, tokens, blocks


def small_args(pair, data: Path, out: Path, *extra: str) -> list[str]:
    teacher, student, _ = pair
    return ["--teacher", str(teacher), "--student", str(student), "--data", str(data), "--out", str(out),
            "--seq-len", "32", "--batch-size", "8", "--micro-batch-size", "2", "--lr", "3e-3", "--steps", "8",
            "--eval-every", "4", *extra]


def test_tokenized_data_gives_the_losses_of_the_raw_text_it_came_from(pair, small_corpus, tmp_path):
    text, tokens, blocks = small_corpus
    assert 8 * 8 > 2 * blocks, "the run should cross two epoch boundaries"
    # Raw text shuffled in windows of exactly one epoch: the permutation tokenized data applies to each epoch.
    run(small_args(pair, text, tmp_path / "raw", "--val-tokens", "128", "--shuffle-window", str(blocks)))
    run(small_args(pair, tokens, tmp_path / "tokenized"))
    raw, tokenized = metrics(tmp_path / "raw"), metrics(tmp_path / "tokenized")
    assert without_timing(tokenized) == without_timing(raw)
    assert len([r for r in raw if "val_loss" in r]) == 3
    weights_raw, weights_tokenized = load_file(tmp_path / "raw" / "model.safetensors"), load_file(
        tmp_path / "tokenized" / "model.safetensors")
    for name in weights_raw:
        assert torch.equal(weights_tokenized[name], weights_raw[name]), name


def test_two_processes_on_tokenized_data_resumed_by_one_follow_the_raw_one_process_run(pair, small_corpus, tmp_path):
    text, tokens, blocks = small_corpus
    common = ("--save-every", "2")
    single = tmp_path / "single"
    run(small_args(pair, text, single, *common, "--val-tokens", "128", "--shuffle-window", str(blocks)))
    script = tmp_path / "die_after_step_4.py"
    script.write_text(DIE_AFTER_STEP_4)
    out = tmp_path / "two-then-one"
    killed = torchrun([str(script)], small_args(pair, tokens, out, *common))
    assert killed.returncode != 0 and (out / "checkpoints" / "step-0000004").is_dir(), killed.stderr[-3000:]
    run(small_args(pair, tokens, out, *common, "--resume"))

    assert_same_losses(metrics(single), metrics(out), rel=1e-4, abs=1e-6)


def test_the_run_says_what_data_it_found_and_how_many_epochs_the_steps_take(pair, small_corpus, tmp_path):
    text, tokens, blocks = small_corpus
    tokenizer = AutoTokenizer.from_pretrained(pair[0])
    documents = [json.loads(line)["text"] for line in text.read_text().splitlines()]
    lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in documents]
    held = next(n for n in range(len(lengths) + 1) if sum(lengths[:n]) >= 128)
    assert blocks == sum(lengths[held:]) // 32
    expected = (f"{len(documents)} documents, {sum(lengths):,} tokens; held out for validation: {held} documents, "
                f"128 tokens; training: {blocks} blocks of 32 tokens an epoch")
    epochs = f"8 steps x 8 blocks of 32 tokens take {64 / blocks:.3g} epochs"
    raw = CliRunner().invoke(cli, ["distill", *small_args(pair, text, tmp_path / "raw", "--val-tokens", "128",
                                                          "--steps", "8", "--eval-every", "0")])
    tokenized = CliRunner().invoke(cli, ["distill", *small_args(pair, tokens, tmp_path / "tokenized", "--steps", "8",
                                                                "--eval-every", "0")])
    for result in (raw, tokenized):
        assert result.exit_code == 0, result.output
        line = next(line for line in result.stderr.splitlines() if line.startswith("data: "))
        assert expected in line and epochs in line, line
    assert "shuffled in windows of 1,024 blocks" in raw.stderr and "all blocks shuffled each epoch" in tokenized.stderr


def _invalid_utf8(path: Path) -> str:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:250]) + lines[250].replace(b'": "', b'": "\xff') + b"".join(lines[251:]))
    return f"{path} line 251: byte 0xff is not UTF-8 text"


def _missing_field_on_the_last_line(path: Path) -> str:
    path.write_text(path.read_text() + json.dumps({"content": "x"}) + "\n")
    return f"{path} line 301: no 'text' field (found: content); pass --text-field NAME"


def _text_named_parquet(path: Path) -> str:
    path.rename(path.with_suffix(".parquet"))
    return f"{path.with_suffix('.parquet')}: not a readable parquet file ("


@pytest.mark.parametrize("damage", [_invalid_utf8, _missing_field_on_the_last_line, _text_named_parquet],
                         ids=["invalid-utf8", "missing-field-last-line", "text-named-parquet"])
def test_bad_data_is_one_line_before_any_model_loads_and_leaves_no_out(damage, pair, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "data.jsonl", sentences(300, seed=1))
    message = damage(data)
    data = next(tmp_path.glob("data.*"))

    def never(*_):
        raise AssertionError("the models were loaded before the data was checked")

    monkeypatch.setattr(loop, "load_models", never)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["distill", *args((pair[0], pair[1], data), out, "--steps", "2")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
    assert not out.exists()


DOCUMENTS_BEFORE_THE_BREAK = 80


def _streamed_with_a_broken_second_file(root: Path) -> Path:
    (root / "hub" / "data").mkdir(parents=True)
    write_jsonl(root / "hub" / "data" / "train-0.jsonl", sentences(DOCUMENTS_BEFORE_THE_BREAK, seed=2))
    (root / "hub" / "data" / "train-1.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "cut sho\n')
    return root / "hub"


@pytest.mark.parametrize("save_every", [2, 0], ids=["keeps-the-last-checkpoint", "nothing-saved-nothing-left"])
def test_a_streamed_document_that_breaks_mid_run_stops_it_in_one_line(save_every, pair, tmp_path, monkeypatch):
    from layersplice.distill import survey

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(survey, "STREAM_CHECK_DOCUMENTS", 10)  # the break lies beyond what is read ahead
    dataset = _streamed_with_a_broken_second_file(tmp_path)
    teacher, student, _ = pair
    out = tmp_path / "out"
    argv = ["distill", "--teacher", str(teacher), "--student", str(student), "--dataset", str(dataset),
            "--out", str(out), "--seq-len", "32", "--batch-size", "8", "--micro-batch-size", "4", "--steps", "40",
            "--val-tokens", "0", "--save-every", str(save_every), "--eval-every", "0", "--shuffle-window", "8"]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: --dataset {dataset} document {DOCUMENTS_BEFORE_THE_BREAK + 1} of process 0's "
                            "share (1 processes): cannot be read ("), error
    assert "the first 10 documents were checked" in result.stderr
    if save_every:
        assert [p.is_dir() for p in (out / "checkpoints").glob("step-*")] in ([True], [True, True])
        assert not (out / "model.safetensors").exists()
    else:
        assert not out.exists()
