"""verify checks the whole directory: any entry the records do not list fails,
naming it (a stray model.safetensors would be loaded in place of the shards),
unless --allow-extra names it; a `build --all` directory is checked at both
levels; layersplice's own hidden lock files never trip it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ALIGNMENTS

from layersplice.checkpoint.atomic import output_lock
from layersplice.cli.main import cli


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def _fails_naming(result, path: Path, hint: str) -> None:
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith(f"error: {path}: not listed in") and f"--allow-extra {hint}" in line, line
    assert "\n" not in line


@pytest.fixture()
def sharded(tmp_path, checkpoints) -> Path:
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    out = tmp_path / "mid"
    result = _run("build", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir), "--keep", "1",
                  "--shard-size", "60kB", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("model-*.safetensors"))) > 1 and not (out / "model.safetensors").exists()
    return out


@pytest.fixture()
def family(tmp_path, checkpoints) -> Path:
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    out = tmp_path / "sizes"
    result = _run("build", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir), "--all",
                  "--name", "m", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_a_stray_single_file_beside_the_shards_fails_verify(sharded):
    shutil.copyfile(next(sharded.glob("model-*.safetensors")), sharded / "model.safetensors")
    _fails_naming(_run("verify", str(sharded)), sharded / "model.safetensors", "model.safetensors")


def test_an_unlisted_file_fails_unless_allowed(sharded):
    assert _run("verify", str(sharded)).exit_code == 0
    (sharded / "NOTES.md").write_text("# my model\n")
    _fails_naming(_run("verify", str(sharded)), sharded / "NOTES.md", "NOTES.md")
    assert _run("verify", str(sharded), "--allow-extra", "NOTES.md").exit_code == 0
    (sharded / "notes").mkdir()  # a folder is an entry too
    _fails_naming(_run("verify", str(sharded), "--allow-extra", "NOTES.md"), sharded / "notes", "notes")
    allowed = _run("verify", str(sharded), "--allow-extra", "NOTES.md", "--allow-extra", "notes")
    assert allowed.exit_code == 0, allowed.output


def test_an_extra_file_in_a_build_all_directory_fails_at_either_level(family):
    assert _run("verify", str(family)).exit_code == 0
    (family / "README.md").write_text("sizes\n")
    _fails_naming(_run("verify", str(family)), family / "README.md", "README.md")
    size = family / "m-4L"
    (size / "NOTES.md").write_text("kept for reference\n")
    _fails_naming(_run("verify", str(family), "--allow-extra", "README.md"), size / "NOTES.md", "m-4L/NOTES.md")
    # Extras are named by their path under the verified directory: a bare NOTES.md is only the top level's.
    result = _run("verify", str(family), "--allow-extra", "README.md", "--allow-extra", "NOTES.md")
    _fails_naming(result, size / "NOTES.md", "m-4L/NOTES.md")
    result = _run("verify", str(family), "--allow-extra", "README.md", "--allow-extra", "m-4L/NOTES.md")
    assert result.exit_code == 0, result.output
    # Verifying the size directory alone names the file by its own path.
    _fails_naming(_run("verify", str(size)), size / "NOTES.md", "NOTES.md")


def test_an_unlisted_size_directory_fails(family):
    (family / "notes").mkdir()
    _fails_naming(_run("verify", str(family)), family / "notes", "notes")
    (family / "notes").rmdir()
    # A folder that holds a size is named with the way to list it (its part record, then assemble).
    shutil.copytree(family / "m-4L", family / "m-4L-copy")
    result = _run("verify", str(family))
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith(f"error: {family}: m-4L-copy in {family} but not in manifest.json") and "\n" not in line


def test_lock_files_of_runs_writing_beside_or_inside_do_not_trip_verify(family):
    with output_lock(family), output_lock(family / "m-4L"), output_lock(family / "m-4L" / "part"):
        assert (family / ".m-4L.layersplice-lock").is_file()
        result = _run("verify", str(family))
        assert result.exit_code == 0, result.output


def test_an_init_student_output_lists_its_student_config(tmp_path, checkpoints):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    out = tmp_path / "student"
    made = _run("init-student", "--teacher", str(pair.teacher_dir), "--out", str(out))
    assert made.exit_code == 0, made.output
    assert (out / "student_config.json").is_file()
    assert _run("verify", str(out)).exit_code == 0
