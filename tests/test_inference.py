"""eval and plan take what they can infer, and say when a request makes no sense for the family.

* `eval --models DIR` alone reads the teacher, student, alignment and patch
  order from the sizes' records, and measures what `--teacher/--student`
  would have measured.
* `plan --params` far outside the family warns; the plan marks the sizes that
  store their own copy of a tied head (checked against the configs `build`
  writes).
* `--name` defaults to the student's name, never the teacher's folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ALIGNMENTS

from layersplice.evaluation.stdlib_text import HELD_OUT_MODULES, write_documents

REPOSITORY = Path(__file__).resolve().parent.parent
RECIPE = REPOSITORY / "recipes" / "tiny.yaml"
EVAL = ("--seq-len", "64", "--max-tokens", "512", "--device", "cpu", "--json")


def run(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layersplice", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={"PYTHONPATH": str(REPOSITORY), "PATH": "/usr/bin:/bin"})


def ok(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = run(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result


def test_eval_models_alone_measures_what_the_named_pair_measures(tmp_path):
    family = tmp_path / "sizes"  # built in the first order, which eval must read from the records
    ok("build", "--recipe", RECIPE, "--order", "first", "--all", "--sizes", "9,12,16", "--out", family)
    held_out = write_documents(tmp_path / "held-out.jsonl", HELD_OUT_MODULES[:2])
    alone = json.loads(ok("eval", "--models", family, "--data", held_out, *EVAL, cwd=tmp_path).stdout)
    named = json.loads(ok("eval", "--recipe", RECIPE, "--order", "first", "--models", family, "--data", held_out,
                          "--out", tmp_path / "named", *EVAL).stdout)
    assert [s["layers"] for s in alone["perplexity"]["sizes"]] == [9, 12, 16]
    assert alone["perplexity"]["sizes"] == named["perplexity"]["sizes"]
    assert alone["out"] == "out/tiny-eval"  # named as the family was built, not after the teacher's folder
    assert (tmp_path / "out" / "tiny-eval" / "eval.json").is_file()


def test_eval_models_alone_says_where_a_recorded_source_is_missing(tmp_path):
    pair = tmp_path / "pair"
    shutil.copytree(REPOSITORY / "fixtures", pair, ignore=shutil.ignore_patterns("*.py"))
    ok("build", "--teacher", "pair/tiny-teacher", "--student", "pair/tiny-student", "--all", "--sizes", "9,16",
       "--out", "sizes", cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run("eval", "--models", tmp_path / "sizes", "--data", REPOSITORY / "README.md", cwd=elsewhere)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --models") and "pair/tiny-teacher" in result.stderr, result.stderr


def test_plan_warns_when_params_lie_outside_the_family():
    far = ok("plan", "--recipe", RECIPE, "--params", "5B")
    assert "warning: --params 5B is outside this family" in " ".join(far.stderr.split())
    near = ok("plan", "--recipe", RECIPE, "--params", "1.2M")
    assert "warning" not in near.stderr


@pytest.fixture(scope="module")
def tied_pair(checkpoints):
    return checkpoints("llama-tied", ALIGNMENTS["1-2-2"])


def test_plan_marks_the_sizes_that_store_an_untied_head(tied_pair, tmp_path):
    models = ("--teacher", tied_pair.teacher_dir, "--student", tied_pair.student_dir)
    planned = json.loads(ok("plan", *models, "--json").stdout)["sizes"]
    written = {}
    for size in planned:  # what the loader reads: an untied head is tie_word_embeddings false
        ok("build", *models, "--keep", size["keep"], "--out", tmp_path / f"keep{size['keep']}")
        config = json.loads((tmp_path / f"keep{size['keep']}" / "config.json").read_text())
        written[size["keep"]] = config.get("tie_word_embeddings", True) is False
    marked = {size["keep"]: size["untied_head"] for size in planned}
    assert marked == written and any(marked.values()) and not all(marked.values())
    table = ok("plan", *models).stdout
    marked_rows = [line for line in table.splitlines() if "*" in line and "│" in line]
    assert len(marked_rows) == sum(size["untied_head"] for size in planned)
    assert "stores its own copy of the tied LM head" in " ".join(table.split())


def test_the_default_name_is_the_students_not_the_teacher_folder(tied_pair, tmp_path):
    shutil.copytree(tied_pair.teacher_dir, tmp_path / "teacher")
    shutil.copytree(tied_pair.student_dir, tmp_path / "my-student")
    ok("build", "--teacher", "teacher", "--student", "./my-student", "--all", "--out", "sizes", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "sizes").iterdir() if p.name.endswith("L")) == [
        "my-student-4L", "my-student-5L", "my-student-6L"]
    ok("build", "--teacher", "teacher", "--student", "my-student", "--student-id", "org/boomerang-x", "--all",
       "--out", "named", cwd=tmp_path)
    assert (tmp_path / "named" / "boomerang-x-6L").is_dir()
