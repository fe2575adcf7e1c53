"""distill refuses what it cannot trust, in one line and without writing: non-finite
weights, damaged checkpoints, another teacher or student, changed settings."""

from __future__ import annotations

import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_distill_support import make_pair, one_thread, pair_with_text  # noqa: F401 - one_thread is an autouse fixture

from layersplice.checkpoint.sealed_json import read_sealed, write_sealed
from layersplice.cli.main import cli
from layersplice.distill import loop
from layersplice.distill.command import distill_command
from layersplice.distill.checkpoint_record import file_records


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return pair_with_text(tmp_path_factory.mktemp("resume"))


def args(pair, out: Path, *extra: str) -> list[str]:
    teacher, student, data = pair
    return ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data),
            "--out", str(out), "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "2",
            "--val-tokens", "256", "--steps", "4", "--save-every", "2", "--eval-every", "0", *extra]


def invoke(argv: list[str]):
    return CliRunner().invoke(cli, argv, catch_exceptions=False)


def assert_refused(result, *fragments: str) -> str:
    """Exit 2 and exactly one line, `error: ...` holding every fragment; returns the line."""
    # the data summary comes before what is found once the models load (the DCP metadata)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("data: ")]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Killed(Exception):
    """Stands for the process being killed."""


@pytest.fixture(scope="module")
def interrupted(pair, tmp_path_factory):
    """A 4-step run killed right after its checkpoint at step 4 (checkpoints at steps 2 and 4;
    a run that finishes seals its student and drops its checkpoints)."""
    out = tmp_path_factory.mktemp("interrupted") / "out"
    save = loop.save_checkpoint

    def save_then_die(config, step, *rest):
        save(config, step, *rest)
        if step == 4:
            raise Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", save_then_die)
        result = CliRunner().invoke(distill_command, args(pair, out)[1:])
    assert isinstance(result.exception, Killed), result.output
    return out


@pytest.fixture
def run_copy(interrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    return out


def checkpoint_entries(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"))


def largest_file(entry: Path) -> Path:
    """The checkpoint's biggest file (the checkpoint itself if it is one file)."""
    files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_keeps_the_newest_two_checkpoints(run_copy):
    assert [p.name for p in checkpoint_entries(run_copy)] == ["step-0000002", "step-0000004"]


@pytest.mark.parametrize("role, value", [("teacher", float("nan")), ("student", float("inf"))])
def test_non_finite_weights_are_refused_naming_the_tensor_and_model(pair, tmp_path, role, value):
    teacher, student, data = pair
    broken = tmp_path / role
    shutil.copytree(teacher if role == "teacher" else student, broken)
    weights = load_file(broken / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name][3, 5] = value
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    models = (broken, student) if role == "teacher" else (teacher, broken)
    out = tmp_path / "out"
    result = invoke(args((*models, data), out))
    assert_refused(result, f"--{role} {broken}", f"tensor '{name}'", "NaN or infinite")
    assert not out.exists()


@pytest.mark.parametrize("defect", ["truncated", "flipped byte"])
def test_a_damaged_checkpoint_is_refused_naming_the_intact_one_before_it(pair, run_copy, defect):
    latest = largest_file(checkpoint_entries(run_copy)[-1])
    raw = bytearray(latest.read_bytes())
    if defect == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0x01
    latest.write_bytes(bytes(raw))
    before = snapshot(run_copy)
    line = assert_refused(invoke(args(pair, run_copy, "--resume")), "step-0000004 is damaged",
                          "step-0000002, is intact")
    assert ("truncated" in line) == (defect == "truncated")
    assert snapshot(run_copy) == before


def test_when_no_checkpoint_is_intact_resume_says_so(pair, run_copy):
    for entry in checkpoint_entries(run_copy):
        path = largest_file(entry)
        raw = bytearray(path.read_bytes())
        raw[-100] ^= 0x80
        path.write_bytes(bytes(raw))
    assert_refused(invoke(args(pair, run_copy, "--resume")), "step-0000004 is damaged",
                   "no earlier checkpoint is intact")


def test_an_edited_manifest_is_refused(pair, run_copy):
    manifest = checkpoint_entries(run_copy)[-1] / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"step": 4', '"step": 3'))
    assert_refused(invoke(args(pair, run_copy, "--resume")), "step-0000004 is damaged", "manifest.json")


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_resume_with_another_model_of_the_same_shapes_is_refused(pair, run_copy, tmp_path, role):
    other_teacher, other_student = make_pair(tmp_path / "other", seed=1)
    teacher, student, data = pair
    models = (other_teacher, student) if role == "teacher" else (teacher, other_student)
    other = models[0] if role == "teacher" else models[1]
    before = snapshot(run_copy)
    assert_refused(invoke(args((*models, data), run_copy, "--resume")),
                   f"--{role} {other} is not the {role} the run in {run_copy} started from",
                   "model.safetensors: blake3")
    assert snapshot(run_copy) == before


def test_a_moved_copy_of_the_same_teacher_is_accepted(pair, run_copy, tmp_path):
    teacher, student, data = pair
    moved = shutil.copytree(teacher, tmp_path / "moved-teacher")
    result = invoke(args((moved, student, data), run_copy, "--resume"))
    assert result.exit_code == 0, result.output


def test_changed_settings_are_each_named_with_old_and_new_value(pair, run_copy):
    before = snapshot(run_copy)
    result = invoke(args(pair, run_copy, "--resume", "--seq-len", "64", "--lr", "1e-3"))
    assert_refused(result, "holds a run with other settings (--seq-len 32 -> 64, --lr 0.0003 -> 0.001); "
                           "resume with the same settings")
    assert snapshot(run_copy) == before


class RunsCode:
    """Unpickling this would create a file: what a crafted checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_dcp_metadata_pickle_is_refused_without_running_it(pair, run_copy, tmp_path):
    folder = checkpoint_entries(run_copy)[-1]
    marker = tmp_path / "code-ran"
    (folder / "state" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    manifest = read_sealed(folder / "manifest.json")[0]
    manifest["files"] = file_records(folder, sorted(manifest["files"]))  # a forger reseals, too
    write_sealed(folder / "manifest.json", manifest)
    assert_refused(invoke(args(pair, run_copy, "--resume")), "its DCP metadata would load pathlib.Path",
                   "is not read")
    assert not marker.exists()


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_temporary(pair, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "layersplice", *args(pair, out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    # torch.save's zip writer reports the short write in its own words ("unexpected pos")
    assert f"writing checkpoint step 2 in {out} failed (" in lines[0] and "run again with --resume" in lines[0]
    assert "Traceback" not in done.stderr
    assert not out.exists()  # the first checkpoint failed: a new run leaves --out as it found it
