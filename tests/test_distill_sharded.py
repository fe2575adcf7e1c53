"""Sharded checkpoints (torch.distributed.checkpoint) and the streamed student export:
each process saves its own shards, a resume with another process count is exact,
and the exported student is what transformers itself would save."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from test_distill_support import one_thread, pair_with_text, tiny_config  # noqa: F401 - one_thread is an autouse fixture
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaForCausalLM

from layersplice.cli.main import cli
from layersplice.distill import export, loop
from layersplice.distill.config import DataSpec, DistillConfig
from layersplice.distill.parallel import World

REPO = Path(__file__).resolve().parents[1]

SETTINGS = ("--seq-len", "32", "--batch-size", "8", "--micro-batch-size", "2", "--val-tokens", "512",
            "--lr", "3e-3", "--shuffle-window", "12", "--eval-every", "0", "--steps", "6")

# Under torchrun: stop right after the checkpoint of step N is written, or right
# after a resume has loaded one, and first dump the whole state as torch's own
# full state dicts give it (the reference the other side is compared with).
STOP_AND_DUMP = """
import sys
from layersplice.distill import loop, sharded
from layersplice.distill.command import distill_command
from test_distill_sharded import Stopped, stop_and_dump

when, dump, mode = sys.argv.pop(1), sys.argv.pop(1), sys.argv.pop(1)
if mode == "async":
    sharded.asynchronous = lambda world: True
stop_and_dump(loop, when, dump)
try:
    distill_command()
except Stopped:
    sys.exit(3)
"""


class Stopped(BaseException):
    """Raised past every handler of the run, as a kill would stop it."""


def full_state(student, optimizer, scheduler) -> dict:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(student, options=options),
            "optimizer": get_optimizer_state_dict(student, optimizer, options=options),
            "scheduler": scheduler.state_dict()}


def stop_and_dump(loop, when: str, dump: str) -> None:
    """Make `loop` dump the full state to `dump` and stop, after saving step `when` or after loading ("load")."""
    save, load = loop.save_checkpoint, loop.load_checkpoint

    def write(state: dict, world) -> None:
        if world.is_main:
            torch.save(state, dump)
        raise Stopped

    def save_then_stop(config, step, student, optimizer, scheduler, data_state, world, checkpoints):
        save(config, step, student, optimizer, scheduler, data_state, world, checkpoints)
        if str(step) == when:
            checkpoints.settle(world, wait=True)
            write(full_state(student, optimizer, scheduler) | {"step": step, "data": data_state}, world)

    def load_then_stop(config, student, optimizer, scheduler, world, checkpoints):
        restored = load(config, student, optimizer, scheduler, world, checkpoints)
        write(full_state(student, optimizer, scheduler) | restored, world)

    if when == "load":
        loop.load_checkpoint = load_then_stop
    else:
        loop.save_checkpoint = save_then_stop


def assert_identical(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return pair_with_text(tmp_path_factory.mktemp("sharded"))


def args(pair, out: Path, *extra: str) -> list[str]:
    teacher, student, data = pair
    return ["--teacher", str(teacher), "--student", str(student), "--data", str(data), "--out", str(out),
            *SETTINGS, *extra]


def one_process(argv: list[str]):
    return CliRunner().invoke(cli, ["distill", *argv], catch_exceptions=False)


def torchrun(processes: int, entry: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *entry, *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def torchrun_stopping(tmp_path: Path, when: str, mode: str, argv: list[str]) -> Path:
    """Two processes that stop after step `when` is saved (or after loading); the state they dumped."""
    script, dump = tmp_path / "stop_and_dump.py", tmp_path / f"dump-{when}-{mode}.pt"
    script.write_text(STOP_AND_DUMP)
    done = torchrun(2, [str(script), when, str(dump), mode], argv)
    assert "exitcode  : 3" in done.stderr and dump.is_file(), done.stderr[-3000:]
    return dump


def one_process_stopping(monkeypatch, tmp_path: Path, when: str, argv: list[str]) -> Path:
    dump = tmp_path / f"dump-{when}.pt"
    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", loop.save_checkpoint)
        patch.setattr(loop, "load_checkpoint", loop.load_checkpoint)
        stop_and_dump(loop, when, str(dump))
        with pytest.raises(Stopped):
            one_process(argv)
    return dump


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_one_process_resumes_what_two_processes_saved_bit_for_bit(pair, tmp_path, monkeypatch, mode):
    out = tmp_path / "out"
    saved = torchrun_stopping(tmp_path, "4", mode, args(pair, out, "--save-every", "2"))
    folder = out / "checkpoints" / "step-0000004"
    shards = sorted(p.name for p in (folder / "state").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    sizes = [(folder / "state" / name).stat().st_size for name in shards[1:]]
    assert max(sizes) < 0.7 * sum(sizes)  # each process wrote its half, not the whole
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]

    loaded = one_process_stopping(monkeypatch, tmp_path, "load", args(pair, out, "--save-every", "2", "--resume"))
    assert_identical(torch.load(loaded, weights_only=True), torch.load(saved, weights_only=True))


def test_two_processes_resume_what_one_process_saved_bit_for_bit(pair, tmp_path, monkeypatch):
    out = tmp_path / "out"
    saved = one_process_stopping(monkeypatch, tmp_path, "2", args(pair, out, "--save-every", "2"))
    loaded = torchrun_stopping(tmp_path, "load", "sync", args(pair, out, "--save-every", "2", "--resume"))
    assert_identical(torch.load(loaded, weights_only=True), torch.load(saved, weights_only=True))


def test_two_processes_then_one_follow_the_uninterrupted_one_process_run(pair, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert one_process(args(pair, whole, "--save-every", "0")).exit_code == 0
    out = tmp_path / "out"
    torchrun_stopping(tmp_path, "4", "sync", args(pair, out, "--save-every", "2"))
    assert one_process(args(pair, out, "--save-every", "2", "--resume")).exit_code == 0
    first, second = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert first.keys() == second.keys()
    # Four steps ran on two processes: their FSDP backward sums gradients in
    # another order than one process does (a 1e-7 difference after one step).
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-4, atol=3e-5, msg=name)


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt_neox":  # transformers renames embed_out to lm_head at load, and back at save
        config = GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)
        return GPTNeoXForCausalLM(config)
    return LlamaForCausalLM(tiny_config(128, 2))


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_the_streamed_export_writes_what_save_pretrained_writes(tmp_path, monkeypatch, family, shard_size):
    start = tmp_path / "start"
    tiny_model(family).to(torch.bfloat16).save_pretrained(start)
    trained = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    if shard_size:
        monkeypatch.setattr(export, "MAX_SHARD_SIZE", shard_size)
    ours = tmp_path / "ours"
    ours.mkdir()
    config = DistillConfig(teacher=start, student=start, out=ours, data=DataSpec(synthetic=True))
    export.export_student(config, trained, torch.bfloat16, World(0, 1, torch.device("cpu")))

    # transformers' save_pretrained given the same tensors (as distill exported before streaming)
    reference = tmp_path / "reference"
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(start), dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16) for k, v in trained.state_dict().items()}
    if shell.config.tie_word_embeddings:
        del state["lm_head.weight"]
    shell.save_pretrained(reference, state_dict=state, max_shard_size=shard_size or export.MAX_SHARD_SIZE)
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    assert (len(names) > 3) == bool(shard_size)
    for name in names:
        if name.endswith(".safetensors"):
            mine, theirs = load_file(ours / name), load_file(reference / name)
            assert mine.keys() == theirs.keys(), name
            assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
            assert safe_open(ours / name, "pt").metadata() == {"format": "pt"}
        else:
            assert (ours / name).read_text() == (reference / name).read_text(), name
    if family == "gpt_neox":
        saved = set().union(*(load_file(ours / n).keys() for n in names if n.endswith(".safetensors")))
        assert "embed_out.weight" in saved and "lm_head.weight" not in saved
