"""An alignment that contradicts the student's own student_config.json is refused, in every command.

The student below was made with 1/2/2 (teacher layers 0,2,4,5); 2/2/1 gives
0,1,3,5: the same layer count, so nothing else notices, and the splice would
pair the wrong layers. Refused with exit 2, one line showing both alignments,
nothing written; `--override-alignment` lets it through on purpose.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ALIGNMENTS

from layersplice.evaluation.stdlib_text import HELD_OUT_MODULES, write_documents

REPOSITORY = Path(__file__).resolve().parent.parent
CONTRADICTING = ("--first", "2", "--every", "2", "--last", "1")  # 0,1,3,5
AGREEING = ("--first", "1", "--every", "2", "--last", "2")  # 0,2,4,5, the student's own


def run(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layersplice", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={"PYTHONPATH": str(REPOSITORY), "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def pair(checkpoints):
    return checkpoints("llama", ALIGNMENTS["1-2-2"])  # with student_config.json


def _commands(pair, out: Path) -> dict[str, list]:
    held_out = write_documents(out.parent / "held-out.jsonl", HELD_OUT_MODULES[:1])
    models = ["--teacher", pair.teacher_dir, "--student", pair.student_dir]
    return {
        "build": ["build", *models, "--keep", "2", "--out", out],
        "build --all": ["build", *models, "--all", "--out", out],
        "plan": ["plan", *models],
        "eval": ["eval", *models, "--data", held_out, "--seq-len", "16", "--max-tokens", "64", "--out", out],
        "transfer": ["transfer", "--base-teacher", pair.teacher_dir, "--teacher", pair.teacher_dir,
                     "--student", pair.student_dir, "--out", out],
    }


@pytest.mark.parametrize("command", ["build", "build --all", "plan", "eval", "transfer"])
def test_a_contradicting_alignment_is_refused_showing_both(pair, tmp_path, command):
    work = tmp_path / "work"
    work.mkdir()
    arguments = _commands(pair, work / "out")[command]
    result = run(*arguments, *CONTRADICTING)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "0,1,3,5" in lines[0] and "0,2,4,5" in lines[0] and "--override-alignment" in lines[0]
    assert result.stdout == ""
    assert not (work / "out").exists()


def test_a_recipe_alignment_that_contradicts_the_student_is_refused(pair, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nteacher: {pair.teacher_dir}\nstudent: {pair.student_dir}\n"
                      "alignment: {first: 2, every: 2, last: 1}\n")
    result = run("build", "--recipe", recipe, "--keep", "2", "--out", tmp_path / "out")
    assert result.returncode == 2 and "recipe" in result.stderr and "0,2,4,5" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_override_alignment_builds_with_the_options_alignment_and_says_so(pair, tmp_path):
    result = run("build", "--teacher", pair.teacher_dir, "--student", pair.student_dir, *CONTRADICTING,
                 "--override-alignment", "--keep", "2", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "--override-alignment" in result.stderr and "0,2,4,5" in result.stderr
    record = json.loads((tmp_path / "out" / "layersplice.json").read_text())
    assert record["alignment"]["copied_teacher_layers"] == list(ALIGNMENTS["2-2-1"])
    checked = run("verify", "--against-sources", tmp_path / "out")  # re-planned with the recorded alignment
    assert checked.returncode == 0, checked.stderr


def test_override_alignment_transfers_and_the_output_verifies_against_its_sources(pair, tmp_path):
    result = run("transfer", "--base-teacher", pair.teacher_dir, "--teacher", pair.teacher_dir, "--student",
                 pair.student_dir, *CONTRADICTING, "--override-alignment", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "--override-alignment" in result.stderr
    checked = run("verify", "--against-sources", tmp_path / "out")
    assert checked.returncode == 0, checked.stderr


def test_options_that_agree_with_the_record_need_no_override(pair, tmp_path):
    result = run("build", "--teacher", pair.teacher_dir, "--student", pair.student_dir, *AGREEING,
                 "--keep", "2", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "note" not in result.stderr
