"""Hub repo ids resolve through huggingface_hub's cache, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ALIGNMENTS
from hub_support import put_snapshot

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


@pytest.fixture()
def hub_cache(tmp_path, checkpoints):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    other = checkpoints("llama", ALIGNMENTS["2-2-1"])
    cache = tmp_path / "hub"
    put_snapshot(cache, "org/teacher", COMMIT_A, pair.teacher_dir)
    put_snapshot(cache, "org/student", COMMIT_A, pair.student_dir)
    put_snapshot(cache, "org/student", COMMIT_B, other.student_dir, ref=None)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return cache, env


def _layersplice(env, *args):
    return subprocess.run([sys.executable, "-m", "layersplice", *args], capture_output=True, text=True, env=env)


def test_repo_ids_resolve_from_the_cache_offline(tmp_path, hub_cache):
    _, env = hub_cache
    out = tmp_path / "out"
    result = _layersplice(env, "build", "--teacher", "org/teacher", "--student", "org/student", "--keep", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    provenance = json.loads((out / "layersplice.json").read_text())
    assert provenance["sources"]["student"]["reference"] == "org/student"
    assert provenance["alignment"]["copied_teacher_layers"] == [0, 2, 4, 5]


def test_revision_pins_a_commit(hub_cache):
    _, env = hub_cache
    result = _layersplice(env, "inspect", "org/student", "--revision", COMMIT_B, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["student_alignment"] == [0, 1, 3, 5]


def test_missing_repo_names_the_id(hub_cache):
    _, env = hub_cache
    result = _layersplice(env, "inspect", "org/absent")
    assert result.returncode == 2
    assert "org/absent" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json"])
def test_a_file_missing_from_a_cached_repo_names_the_id(tmp_path, checkpoints, missing):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    partial = tmp_path / "partial"
    partial.mkdir()
    for file in pair.teacher_dir.iterdir():
        if file.name != missing:
            (partial / file.name).write_bytes(file.read_bytes())
    cache = tmp_path / "hub"
    put_snapshot(cache, "org/partial", COMMIT_A, partial)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    result = _layersplice(env, "inspect", "org/partial")
    assert result.returncode == 2
    assert "org/partial" in result.stderr and missing in result.stderr and "Traceback" not in result.stderr
