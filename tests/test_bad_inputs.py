"""Every class of bad input: a one-line error naming the file, exit 2, no traceback,
and nothing at the output path (tests/README.md lists them)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import ALIGNMENTS

SHARD = "model.safetensors"


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _edit_header(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        header, data = _header(directory / SHARD)
        edit(header)
        _write(directory / SHARD, header, data)

    return apply


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _truncate(directory: Path) -> None:
    path = directory / SHARD
    path.write_bytes(path.read_bytes()[:1000])


def _huge_header_length(directory: Path) -> None:
    path = directory / SHARD
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**12) + raw[8:])


def _not_json(directory: Path) -> None:
    path = directory / SHARD
    raw = bytearray(path.read_bytes())
    raw[8] = ord("!")
    path.write_bytes(bytes(raw))


def _unknown_dtype(h):
    h[_first_tensor(h)]["dtype"] = "Q7"


def _offsets_outside(h):
    h[_first_tensor(h)]["data_offsets"][1] = 10**9


def _overlap(h):
    names = [k for k in h if k != "__metadata__"]
    a, b = h[names[0]], h[names[1]]
    length = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + length]


def _size_mismatch(h):
    h[_first_tensor(h)]["shape"][0] += 1


def _to_sharded(directory: Path, weight_map_edit: Callable[[dict], None]) -> None:
    header, _ = _header(directory / SHARD)
    weight_map = {name: SHARD for name in header if name != "__metadata__"}
    weight_map_edit(weight_map)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _index_escape(directory: Path) -> None:
    shutil.copy(directory / SHARD, directory.parent / "outside.safetensors")
    _to_sharded(directory, lambda m: m.update({k: "../outside.safetensors" for k in list(m)[:1]}))


def _index_absolute(directory: Path) -> None:
    _to_sharded(directory, lambda m: m.update({k: str(directory / SHARD) for k in list(m)[:1]}))


def _index_missing_file(directory: Path) -> None:
    _to_sharded(directory, lambda m: m.update({k: "model-00002-of-00002.safetensors" for k in list(m)[:1]}))


def _index_missing_tensor(directory: Path) -> None:
    _to_sharded(directory, lambda m: m.pop(next(iter(m))))


def _edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        edit(config)
        (directory / "config.json").write_text(json.dumps(config))

    return apply


def _no_config(directory: Path) -> None:
    (directory / "config.json").unlink()


def _config_not_json(directory: Path) -> None:
    (directory / "config.json").write_text("{nope")


def _oversized_config(directory: Path) -> None:
    """Valid JSON, padded past the cap (16 MiB) with whitespace."""
    text = (directory / "config.json").read_text()
    (directory / "config.json").write_text(text + " " * (16 << 20))


def _oversized_index(directory: Path) -> None:
    """A valid index padded past the cap (64 MiB) with whitespace."""
    _to_sharded(directory, lambda m: None)
    with open(directory / "model.safetensors.index.json", "a") as index:
        index.write(" " * (64 << 20))


def _pickle_only(directory: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(directory / SHARD), directory / "pytorch_model.bin")
    (directory / SHARD).unlink()


# (id, mutation of a copy of the teacher, fragment the one-line error must contain)
BAD_INPUTS = [
    ("truncated-file", _truncate, "does not fit"),
    ("header-length-absurd", _huge_header_length, "header length"),
    ("header-not-json", _not_json, "not valid UTF-8 JSON"),
    ("unknown-dtype", _edit_header(_unknown_dtype), "unknown dtype 'Q7'"),
    ("offsets-outside-data", _edit_header(_offsets_outside), "outside the"),
    ("overlapping-tensors", _edit_header(_overlap), "overlap"),
    ("shape-dtype-size-mismatch", _edit_header(_size_mismatch), "needs"),
    ("index-path-escape", _index_escape, "not a plain file name"),
    ("index-absolute-path", _index_absolute, "not a plain file name"),
    ("index-missing-shard", _index_missing_file, "does not exist"),
    ("index-missing-tensor", _index_missing_tensor, "missing from the index"),
    ("config-layer-count", _edit_config(lambda c: c.update(num_hidden_layers=5)), "num_hidden_layers=5"),
    ("config-hidden-size", _edit_config(lambda c: c.update(hidden_size=48)), "hidden_size=48"),
    ("config-missing", _no_config, "no config.json"),
    ("config-not-json", _config_not_json, "not valid JSON"),
    ("pickle-without-opt-in", _pickle_only, "--allow-pickle"),
    ("config-oversized", _oversized_config, "a config.json may hold; is this the right file?"),
    ("index-oversized", _oversized_index, "an index may hold; is this the right file?"),
]


def run_build(teacher: Path, student: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["build", "--teacher", str(teacher), "--student", str(student), "--keep", "1", "--out", str(out), *extra]
    return subprocess.run([sys.executable, "-m", "layersplice", *args], capture_output=True, text=True)


def assert_clean_failure(result: subprocess.CompletedProcess, out: Path, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".layersplice-" in p.name]


@pytest.mark.parametrize(("mutate", "fragment"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_teacher_is_refused_with_one_line_and_nothing_written(tmp_path, checkpoints, mutate, fragment):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    teacher = tmp_path / "inputs" / "teacher"
    shutil.copytree(pair.teacher_dir, teacher)
    mutate(teacher)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    result = run_build(teacher, pair.student_dir, out_parent / "out")
    assert_clean_failure(result, out_parent / "out", fragment)


def test_debug_shows_the_traceback(tmp_path, checkpoints):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    teacher = tmp_path / "teacher"
    shutil.copytree(pair.teacher_dir, teacher)
    _truncate(teacher)
    result = subprocess.run(
        [sys.executable, "-m", "layersplice", "--debug", "inspect", str(teacher)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_pickle_weights_with_opt_in_build_the_same_bytes(tmp_path, checkpoints):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    teacher = tmp_path / "teacher"
    shutil.copytree(pair.teacher_dir, teacher)
    _pickle_only(teacher)
    from_pickle, from_safetensors = tmp_path / "a", tmp_path / "b"
    assert run_build(teacher, pair.student_dir, from_pickle, "--allow-pickle").returncode == 0
    assert run_build(pair.teacher_dir, pair.student_dir, from_safetensors).returncode == 0
    assert (from_pickle / SHARD).read_bytes() == (from_safetensors / SHARD).read_bytes()


def test_symlinked_shards_like_the_hub_cache_are_followed(tmp_path, checkpoints):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    teacher = tmp_path / "snapshot"
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    teacher.mkdir()
    for file in pair.teacher_dir.iterdir():
        shutil.copy(file, blobs / file.name)
        os.symlink(os.path.relpath(blobs / file.name, teacher), teacher / file.name)
    assert run_build(teacher, pair.student_dir, tmp_path / "out").returncode == 0
