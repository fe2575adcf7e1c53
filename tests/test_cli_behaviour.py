"""User-facing behaviour of the CLI: one-line errors with exit 2, no partial outputs,
recipes, --force rules, plan/inspect output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ALIGNMENTS

LAYERSPLICE = [sys.executable, "-m", "layersplice"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*LAYERSPLICE, *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def llama(checkpoints):
    return checkpoints("llama", ALIGNMENTS["1-2-2"])


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error:") or message.startswith("Usage:"), message
    for fragment in fragments:
        assert fragment in message


def test_missing_teacher_directory_is_one_line_exit_2_and_writes_nothing(tmp_path, llama):
    out = tmp_path / "out"
    result = run("build", "--teacher", str(tmp_path / "nope"), "--student", str(llama.student_dir), "--keep", "2", "--out", str(out))
    assert_user_error(result, "no such directory")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_alignment_that_does_not_fit_the_student_is_refused_before_writing(tmp_path, llama):
    out = tmp_path / "out"
    result = run("build", "--teacher", str(llama.teacher_dir), "--student", str(llama.student_dir),
                 "--copied-teacher-layers", "0,2,4", "--override-alignment", "--keep", "1", "--out", str(out))
    assert_user_error(result, "student has 4 layers")
    assert not out.exists()


def test_mismatched_hidden_sizes_are_an_error(tmp_path, llama, checkpoints):
    gpt2 = checkpoints("gpt2", ALIGNMENTS["1-2-2"])
    result = run("build", "--teacher", str(llama.teacher_dir), "--student", str(gpt2.student_dir), "--keep", "1", "--out", str(tmp_path / "o"))
    assert_user_error(result, "same family")


def test_existing_output_needs_force_and_force_only_replaces_layersplice_outputs(tmp_path, llama):
    out = tmp_path / "out"
    args = ["build", "--teacher", str(llama.teacher_dir), "--student", str(llama.student_dir), "--keep", "2", "--out", str(out)]
    assert run(*args).returncode == 0
    assert_user_error(run(*args), "already exists", "--force")
    assert run(*args, "--force").returncode == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    result = run("build", "--teacher", str(llama.teacher_dir), "--student", str(llama.student_dir), "--keep", "2", "--out", str(mine), "--force")
    assert_user_error(result, "not written by layersplice")
    assert (mine / "notes.txt").read_text() == "precious"


def test_size_must_be_chosen_exactly_once(tmp_path, llama):
    result = run("build", "--teacher", str(llama.teacher_dir), "--student", str(llama.student_dir), "--keep", "2", "--patch", "1", "--out", str(tmp_path / "o"))
    assert_user_error(result, "exactly one of")


def test_recipe_unknown_key_names_its_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nteacher: a\nstudent: b\norder: last\nshardsize: 1GB\n")
    assert_user_error(run("plan", "--recipe", str(recipe)), f"{recipe}:5", "shardsize", "unknown key")


def test_recipe_value_of_the_wrong_type_names_its_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nteacher: a\nstudent: b\nalignment:\n  first: 1\n  every: two\n  last: 2\n")
    assert_user_error(run("plan", "--recipe", str(recipe)), f"{recipe}:6", "alignment.every", "expected an integer")


def test_help_lists_torch_commands_without_importing_torch():
    from click.testing import CliRunner

    from layersplice.cli.main import LayerspliceGroup, cli

    script = "import sys\nfrom layersplice.cli.main import main\ntry:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert any(line.split()[:3] == ["distill", "Distill", "a"] for line in done.stdout.splitlines() if line.strip())
    # The summary kept for --help is the command's own first line.
    for name, (target, summary) in LayerspliceGroup.lazy_commands.items():
        real = CliRunner().invoke(cli, [name, "--help"])
        assert real.exit_code == 0
        assert real.output.split("\n\n")[1].strip() == summary


def test_recipe_paths_resolve_from_the_recipe_folder_and_out_from_the_pattern(tmp_path, llama):
    recipe = tmp_path / "recipes" / "pair.yaml"
    recipe.parent.mkdir()
    recipe.write_text(
        f"name: pair\nteacher: {llama.teacher_dir}\nstudent: {llama.student_dir}\n"
        "alignment:\n  first: 1\n  every: 2\n  last: 2\norder: first\nout: built/{name}-{layers}L\n"
    )
    result = run("build", "--recipe", str(recipe), "--keep", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    provenance = json.loads((tmp_path / "built" / "pair-5L" / "layersplice.json").read_text())
    assert provenance["choice"] == {"keep": 3, "order": "first"}
    assert provenance["patched_blocks"] == [0]


def test_plan_json_lists_every_keep_with_sizes(llama):
    result = run("plan", "--teacher", str(llama.teacher_dir), "--student", str(llama.student_dir), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [s["keep"] for s in plan["sizes"]] == [4, 3, 2, 1, 0]
    assert [s["layers"] for s in plan["sizes"]] == [4, 4, 4, 5, 6]
    assert plan["sizes"][-1]["teacher_blocks"] == [0, 1, 2, 3]
    assert plan["sizes"][0]["parameters"] < plan["sizes"][-1]["parameters"]


def test_inspect_reports_family_layers_and_student_alignment(llama):
    result = run("inspect", str(llama.student_dir), "--json")
    info = json.loads(result.stdout)
    assert info["family"] == "llama" and not info["inferred"]
    assert info["layers"] == 4
    assert info["student_alignment"] == [0, 2, 4, 5]
    assert info["parameters"] == sum(p.numel() for p in llama.student.parameters())


def test_build_all_writes_every_size_and_a_manifest(tmp_path, llama):
    out = tmp_path / "sizes"
    result = run("build", "--teacher", str(llama.teacher_dir), "--student", str(llama.student_dir), "--all", "--out", str(out), "--name", "tiny")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["directory"] for s in manifest["sizes"]] == ["tiny-4L", "tiny-5L", "tiny-6L"]
    for size in manifest["sizes"]:
        provenance = json.loads((out / size["directory"] / "layersplice.json").read_text())
        assert len(provenance["layers"]) == size["layers"]
        assert set(size["files"]) == set(provenance["files"]) | {"layersplice.json"}
