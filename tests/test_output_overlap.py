"""No command writes where it reads: an --out that is, contains or lies inside a
source is refused (exit 2, one line) with or without --force, symlinks and `..`
seen through, and every source is left byte for byte as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from layersplice.cli.main import cli

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
CALIB_TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture()
def inputs(tmp_path) -> dict[str, Path]:
    """Writable copies of every kind of source, each in its own folder."""
    root = tmp_path / "inputs"
    shutil.copytree(FIXTURES / "tiny-teacher", root / "teacher")
    shutil.copytree(FIXTURES / "tiny-student", root / "student")
    for name, text in (("order", '{"patch_order": [4, 3, 2, 1, 0]}\n'), ("calib", CALIB_TEXT), ("data", CALIB_TEXT)):
        (root / name).mkdir()
        (root / name / f"{name}.{'json' if name == 'order' else 'txt'}").write_text(text)
    return {
        "teacher": root / "teacher", "student": root / "student", "order": root / "order" / "order.json",
        "calib": root / "calib" / "calib.txt", "data": root / "data",  # --data also takes a folder
    }


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _command(name: str, paths: dict[str, Path], out: Path) -> list[str]:
    pair = ["--teacher", str(paths["teacher"]), "--student", str(paths["student"])]
    return {
        "build": ["build", *pair, "--keep", "2", "--out", str(out), "--force"],
        "build-order-file": ["build", *pair, "--order-file", str(paths["order"]), "--keep", "2", "--out", str(out), "--force"],
        "build-calib": ["build", *pair, "--order", "kl", "--calib", str(paths["calib"]), "--keep", "2", "--out", str(out), "--force"],
        "build-all": ["build", *pair, "--all", "--out", str(out), "--force"],
        "build-all-order-file": ["build", *pair, "--order-file", str(paths["order"]), "--all", "--out", str(out), "--force"],
        "init-student": ["init-student", "--teacher", str(paths["teacher"]), "--out", str(out), "--force"],
        "eval": ["eval", *pair, "--data", str(paths["data"]), "--sizes", "0", "--seq-len", "16", "--out", str(out)],
        "distill": ["distill", *pair, "--data", str(paths["data"]), "--steps", "1", "--device", "cpu", "--out", str(out)],
    }[name]


# (command, the source --out collides with)
CASES = [
    ("build", "teacher"), ("build", "student"), ("build-order-file", "order"), ("build-calib", "calib"),
    ("build-all", "teacher"), ("build-all", "student"), ("build-all-order-file", "order"),
    ("init-student", "teacher"),
    ("eval", "teacher"), ("eval", "student"), ("eval", "data"),
    ("distill", "teacher"), ("distill", "student"), ("distill", "data"),
]
FORMS = ["the-source", "a-symlink-to-it", "inside-or-around-it"]


def _colliding_out(source: Path, form: str, tmp_path: Path) -> tuple[Path, str]:
    """An --out that collides with `source` in the given way, and the relation the error names."""
    if form == "the-source":
        return source.parent / ".." / source.parent.name / source.name, "is"  # `..` seen through
    if form == "a-symlink-to-it":
        link = tmp_path / "link"
        link.symlink_to(source)
        return link, "is"
    if source.is_dir():
        return source / "sub" / "out", "lies inside"
    return source.parent, "contains"  # nothing lies inside a file: the folder around it


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("command", "kind"), CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_out_overlapping_a_source_is_refused_and_the_source_is_untouched(tmp_path, inputs, command, kind, form):
    before = _tree(tmp_path / "inputs")
    out, relation = _colliding_out(inputs[kind], form, tmp_path)
    result = CliRunner().invoke(cli, _command(command, inputs, out))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --out") and "Traceback" not in result.output, result.output
    assert f" {relation} " in errors[0] and "would destroy an input" in errors[0], errors[0]
    assert _tree(tmp_path / "inputs") == before
    assert not [p for p in (tmp_path / "inputs").rglob("*") if ".layersplice-" in p.name]


def test_rebuilding_over_the_student_it_reads_keeps_the_only_copy(tmp_path):
    """The reported loss: a student from init-student, then build --out STUDENT --force."""
    student = tmp_path / "student"
    runner = CliRunner()
    made = runner.invoke(cli, ["init-student", "--teacher", str(FIXTURES / "tiny-teacher"), "--out", str(student)])
    assert made.exit_code == 0, made.output
    before = _tree(student)
    result = runner.invoke(cli, ["build", "--teacher", str(FIXTURES / "tiny-teacher"), "--student", str(student),
                                 "--keep", "2", "--out", str(student), "--force"])
    assert result.exit_code == 2 and "is the student" in result.output, result.output
    assert _tree(student) == before
    assert runner.invoke(cli, ["verify", str(student)]).exit_code == 0


def test_outputs_beside_the_sources_are_still_written(tmp_path, inputs):
    """The rule refuses overlap only: a sibling whose name starts like a source is fine."""
    out = inputs["student"].parent / "student-mid"
    result = CliRunner().invoke(cli, _command("build", inputs, out))
    assert result.exit_code == 0, result.output
    assert (out / "layersplice.json").is_file()
