"""Outputs appear whole or not at all: signals, SIGKILL, write errors, resume,
determinism, and verify catching any flipped byte."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from blake3 import blake3
from conftest import ALIGNMENTS

from layersplice.checkpoint.sealed_json import read_sealed, seal

HIDDEN, INTER, VOCAB = 1024, 4096, 8192
LAYER = {
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.v_proj.weight": (HIDDEN, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "mlp.gate_proj.weight": (INTER, HIDDEN), "mlp.up_proj.weight": (INTER, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, INTER),
    "input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,),
}


def _sparse_checkpoint(directory: Path, n_layers: int) -> None:
    """A Llama-shaped fp32 checkpoint whose data is a sparse hole: big, but instant to make."""
    directory.mkdir()
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(n_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in LAYER.items()})
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 4 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(directory / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + offset)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": n_layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": VOCAB, "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    _sparse_checkpoint(root / "teacher", 6)
    _sparse_checkpoint(root / "student", 4)
    (root / "student" / "student_config.json").write_text(
        json.dumps({"pruned_teacher_layers": [1, 3], "copied_teacher_layers": [0, 2, 4, 5]}))
    return root / "teacher", root / "student"


def _start(teacher, student, out, *extra, **kwargs) -> subprocess.Popen:
    args = [sys.executable, "-m", "layersplice", "build", "--teacher", str(teacher), "--student", str(student),
            "--out", str(out), *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _temporaries(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".layersplice-" in p.name]


def _interruptible() -> None:
    """SIGINT at its default, as for a command typed at a terminal. A test run started in the
    background of a non-interactive shell (`cmd &`) inherits SIGINT ignored, and so would the
    build, which then rightly keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_temporary(parent: Path, proc: subprocess.Popen, polls: int = 60_000) -> Path:
    """The build's temporary once it holds data. At least 1 ms between polls: the bound
    stops a hang (a minute or more), it does not time the build."""
    for _ in range(polls):
        found = [p for p in _temporaries(parent) if p.is_dir() and any(p.iterdir())]
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.001)
    raise AssertionError("the build never started writing")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_clean_up(tmp_path, big_pair, sig, code):
    out = tmp_path / "out"
    proc = _start(*big_pair, out, "--keep", "1", "--dtype", "bf16", preexec_fn=_interruptible)
    _wait_for_temporary(tmp_path, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert not out.exists() and _temporaries(tmp_path) == []


def test_sigkill_leaves_no_target_and_the_next_run_removes_the_temporary(tmp_path, big_pair):
    out = tmp_path / "out"
    proc = _start(*big_pair, out, "--keep", "1", "--dtype", "bf16")
    temporary = _wait_for_temporary(tmp_path, proc)
    proc.kill()
    proc.wait()
    assert not out.exists()
    assert temporary.exists()  # what a killed run leaves: a hidden, recognisable temporary
    other = tmp_path / "other"
    assert _start(*big_pair, other, "--keep", "4").wait() == 0
    assert not temporary.exists()
    assert other.exists()


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))


def test_write_error_is_one_clean_line_and_removes_temporaries(tmp_path, big_pair):
    out = tmp_path / "out"
    proc = _start(*big_pair, out, "--keep", "1", preexec_fn=_limit_file_size)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "writing" in lines[0] and "File too large" in lines[0], stderr
    assert not out.exists() and _temporaries(tmp_path) == []


def _sha_tree(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layersplice", *args], capture_output=True, text=True)


def test_same_inputs_give_byte_identical_outputs(tmp_path, checkpoints):
    pair = checkpoints("qwen3", ALIGNMENTS["1-2-2"])
    for out in ("a", "b"):
        result = _cli("build", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir),
                      "--all", "--out", str(tmp_path / out), "--shard-size", "60kB")
        assert result.returncode == 0, result.stderr
    assert _sha_tree(tmp_path / "a") == _sha_tree(tmp_path / "b")
    assert len([n for n in _sha_tree(tmp_path / "a") if n.endswith(".safetensors")]) > 3


@pytest.fixture()
def built(tmp_path, checkpoints):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    out = tmp_path / "out"
    result = _cli("build", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir), "--keep", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert _cli("verify", str(out)).returncode == 0
    return out


def test_verify_catches_a_flipped_byte_anywhere(built):
    from click.testing import CliRunner

    from layersplice.cli.main import cli

    rng = random.Random(0)
    files = sorted(p for p in built.iterdir() if p.is_file())
    for path in files:
        original = path.read_bytes()
        for position in sorted({0, len(original) - 1, *(rng.randrange(len(original)) for _ in range(4))}):
            flipped = bytearray(original)
            flipped[position] ^= 0x01
            path.write_bytes(bytes(flipped))
            result = CliRunner().invoke(cli, ["verify", str(built)])
            assert result.exit_code == 2, f"{path.name}@{position} passed verify"
            assert result.output.startswith("error:") and "Traceback" not in result.output
        path.write_bytes(original)
    assert _cli("verify", str(built)).returncode == 0


def test_verify_against_sources_catches_a_consistently_resealed_change(built):
    shard = built / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    provenance, _ = read_sealed(built / "layersplice.json")
    provenance["files"]["model.safetensors"]["blake3"] = blake3(bytes(data)).hexdigest()
    (built / "layersplice.json").write_text(seal(provenance))
    assert _cli("verify", str(built)).returncode == 0
    result = _cli("verify", str(built), "--against-sources")
    assert result.returncode == 2 and "differs from" in result.stderr


def test_build_all_resumes_from_a_killed_run_keeping_verified_sizes(tmp_path, checkpoints):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    args = ["build", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir), "--all", "--name", "m"]
    assert _cli(*args, "--out", str(tmp_path / "done")).returncode == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # What a run killed after two sizes leaves: its temporary, no manifest, one size half-written.
    leftover = tmp_path / f".sizes.layersplice-tmp-{dead.pid}"
    os.rename(tmp_path / "done", leftover)
    (leftover / "manifest.json").unlink()
    (leftover / "m-6L" / "layersplice.json").unlink()
    kept = {n: (leftover / n / "model.safetensors").stat().st_mtime_ns for n in ("m-4L", "m-5L")}
    result = _cli(*args, "--out", str(tmp_path / "sizes"))
    assert result.returncode == 0, result.stderr
    assert {n: (tmp_path / "sizes" / n / "model.safetensors").stat().st_mtime_ns for n in kept} == kept
    assert _cli("verify", str(tmp_path / "sizes")).returncode == 0
    assert not leftover.exists()


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_of_four_concurrent_builds_to_one_new_out_exactly_one_wins(tmp_path, big_pair):
    out = tmp_path / "out"
    procs = [_start(*big_pair, out, "--keep", "1", "--dtype", "bf16") for _ in range(4)]
    stderrs = [proc.communicate(timeout=300)[1] for proc in procs]
    codes = [proc.returncode for proc in procs]
    assert sorted(codes) == [0, 2, 2, 2], stderrs
    for code, stderr in zip(codes, stderrs):
        if code == 2:
            assert "exists" in _one_error_line(stderr)
    assert _cli("verify", str(out)).returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporaries, no lock file


def test_of_four_concurrent_build_all_runs_on_one_out_exactly_one_wins(tmp_path, checkpoints):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    out = tmp_path / "sizes"
    args = [sys.executable, "-m", "layersplice", "build", "--teacher", str(pair.teacher_dir),
            "--student", str(pair.student_dir), "--all", "--out", str(out)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    stderrs = [proc.communicate(timeout=300)[1] for proc in procs]
    assert sorted(proc.returncode for proc in procs) == [0, 2, 2, 2], stderrs
    assert _cli("verify", str(out)).returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["sizes"]


def test_a_second_run_refuses_while_another_holds_the_output(tmp_path, checkpoints):
    """What a second `build --all` sees while the first is still writing OUT (here the test holds its lock)."""
    from layersplice.checkpoint.atomic import output_lock

    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    out = tmp_path / "sizes"
    args = ["build", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir), "--all", "--out", str(out)]
    with output_lock(out):
        for force in ([], ["--force"]):
            result = _cli(*args, *force)
            assert result.returncode == 2
            line = _one_error_line(result.stderr)
            assert f"being written by another layersplice run (pid {os.getpid()})" in line, line
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # the lock file goes with the lock
    assert _cli(*args).returncode == 0


def test_output_lock_is_held_by_one_holder_at_a_time(tmp_path):
    from layersplice.checkpoint.atomic import OutputBusy, lock_path, output_lock

    target = tmp_path / "out"
    with output_lock(target):
        assert lock_path(target).read_text().strip() == str(os.getpid())
        with pytest.raises(OutputBusy, match="being written"):
            with output_lock(target):
                pass
    assert not lock_path(target).exists()
    with output_lock(target):  # free again once released
        pass


def test_a_target_another_program_creates_meanwhile_is_never_replaced(tmp_path):
    from layersplice.checkpoint.atomic import atomic_directory
    from layersplice.errors import OutputError

    target = tmp_path / "out"
    with pytest.raises(OutputError, match="already exists: another program created it"):
        with atomic_directory(target, inputs=[]) as tmp:
            (tmp / "layersplice.json").write_text("new")
            target.mkdir()
            (target / "theirs.txt").write_text("keep me")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_never_leaves_a_moment_without_a_complete_output(tmp_path, checkpoints):
    """A reader polling the output while --force replaces it, again and again, always
    finds a complete old or new output: its intact record and every file it lists."""
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    out = tmp_path / "out"
    args = ["build", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir), "--out", str(out)]
    records = {}
    for keep in ("1", "3"):
        assert _cli(*args, "--keep", keep, "--force").returncode == 0
        records[keep] = (out / "layersplice.json").read_text()
    loop = ("import subprocess, sys\n"
            f"for keep in ['1', '3'] * 4:\n"
            f"    subprocess.run([sys.executable, '-m', 'layersplice', *{args!r}, '--keep', keep, '--force'], check=True)\n")
    writer = subprocess.Popen([sys.executable, "-c", loop], stderr=subprocess.PIPE, text=True)
    seen = {keep: 0 for keep in records}
    while writer.poll() is None:
        text = (out / "layersplice.json").read_text()  # FileNotFoundError here is the failure
        keep = next(k for k, record in records.items() if record == text)
        listed = json.loads(text)["files"]
        assert all((out / name).is_file() for name in listed)
        seen[keep] += 1
    assert writer.returncode == 0, writer.stderr.read()
    assert all(count > 0 for count in seen.values()), seen
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
