"""NaN and infinity never reach an output silently: a cast (`build --dtype`,
`init-student --dtype`) refuses a source tensor that holds them, and a finite
value the target dtype cannot hold, in one line naming the tensor and the
model, with nothing written. Checked against numpy/torch's own idea of finite
on both cast paths (compiled and numpy). Every JSON document and record is
strict JSON (no NaN or Infinity literals). Transfer's three sources:
tests/test_transfer.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ALIGNMENTS
from safetensors.torch import load_file, save_file

from layersplice.checkpoint import cast
from layersplice.checkpoint.sealed_json import read_sealed, write_sealed
from layersplice.checkpoint.strict_json import dumps

TENSOR = "model.layers.2.mlp.up_proj.weight"  # a kept teacher layer (1-2-2 keeps 0, 2, 4, 5)
NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
PAIRS = [("F32", "BF16"), ("F32", "F16"), ("BF16", "F32"), ("BF16", "F16"), ("F16", "BF16"), ("F16", "F32"),
         ("F64", "F32"), ("F32", "F64")]


def _raw(values: np.ndarray, dtype: str) -> bytes:
    return torch.from_numpy(values.astype(np.float64)).to(TORCH_DTYPES[dtype]).view(torch.uint8).numpy().tobytes()


def _casts(src: str, dst: str) -> list[cast.Cast]:
    """The cast as layersplice runs it, and with the compiled loop switched off."""
    compiled = cast.Cast(src, dst)
    plain = cast.Cast(src, dst)
    plain._compiled = None
    return [compiled, plain] if compiled.is_native else [plain]


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{s}-{d}" for s, d in PAIRS])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_a_non_finite_source_value_is_refused_at_its_element(src, dst, bad):
    values = np.random.default_rng(0).standard_normal(300_000) * 0.02  # spans several numpy chunks
    values[200_001] = bad
    for converter in _casts(src, dst):
        source = _raw(values, src)
        with pytest.raises(cast.NonFinite) as raised:
            converter.convert(source, bytearray(len(values) * converter.out_size))
        assert raised.value.element == 200_001 and raised.value.in_source
        assert math.isnan(raised.value.value) if math.isnan(bad) else raised.value.value == bad


@pytest.mark.parametrize(("src", "dst", "value"), [("F32", "F16", 1e6), ("F32", "BF16", 3.4e38), ("BF16", "F16", 1e5),
                                                  ("F64", "F32", 1e39)])
def test_a_finite_value_beyond_the_targets_range_is_refused_as_overflow(src, dst, value):
    values = np.full(1000, 0.5)
    values[17] = value
    for converter in _casts(src, dst):
        with pytest.raises(cast.NonFinite) as raised:
            converter.convert(_raw(values, src), bytearray(1000 * converter.out_size))
        assert raised.value.element == 17 and not raised.value.in_source
        assert raised.value.value == pytest.approx(value, rel=1e-2)


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{s}-{d}" for s, d in PAIRS])
def test_every_value_torch_casts_to_a_finite_one_passes(src, dst):
    """No false alarm: each dtype's largest finite values and subnormals, where torch's own cast stays finite."""
    largest = float(torch.finfo(TORCH_DTYPES[dst]).max)
    values = np.array([0.0, -0.0, 1e-40, 5e-324, 65504.0, -65504.0, largest, -largest, 3.3e38, 1.5, 1000.0, -3.25])
    source = torch.from_numpy(values).to(TORCH_DTYPES[src])
    kept = source[torch.isfinite(source) & torch.isfinite(source.to(TORCH_DTYPES[dst]))]
    expected = kept.to(TORCH_DTYPES[dst]).view(torch.uint8).numpy().tobytes()
    assert len(kept) >= 6
    for converter in _casts(src, dst):
        output = bytearray(len(kept) * converter.out_size)
        assert bytes(converter.convert(kept.view(torch.uint8).numpy().tobytes(), output)) == expected


def _with_bad_value(directory: Path, value: float, name: str = TENSOR) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    tensors[name].view(-1)[5] = value
    save_file(tensors, path, metadata={"format": "pt"})


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layersplice", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def _assert_refused(result: subprocess.CompletedProcess, out: Path, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert not out.exists() and not [p for p in out.parent.iterdir() if ".layersplice-" in p.name]


@pytest.fixture()
def copied_pair(tmp_path, checkpoints):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    teacher, student = tmp_path / "in" / "teacher", tmp_path / "in" / "student"
    shutil.copytree(pair.teacher_dir, teacher)
    shutil.copytree(pair.student_dir, student)
    (tmp_path / "outs").mkdir()
    return teacher, student, tmp_path / "outs" / "out"


@pytest.mark.parametrize("native", ["1", "0"], ids=["compiled", "numpy"])
@pytest.mark.parametrize("bad", [math.nan, -math.inf], ids=["nan", "-inf"])
def test_build_dtype_refuses_a_non_finite_teacher_tensor_and_writes_nothing(copied_pair, native, bad):
    teacher, student, out = copied_pair
    _with_bad_value(teacher, bad)
    result = _cli("build", "--teacher", str(teacher), "--student", str(student), "--keep", "0", "--dtype", "bf16",
                  "--out", str(out), env={"LAYERSPLICE_NATIVE": native})
    _assert_refused(result, out, f"{teacher / 'model.safetensors'}: tensor '{TENSOR}' of the teacher",
                    "NaN" if math.isnan(bad) else "-inf", "at element 5")


def test_build_all_refuses_a_non_finite_student_tensor(copied_pair):
    teacher, student, out = copied_pair
    _with_bad_value(student, math.inf, "model.layers.1.mlp.up_proj.weight")
    result = _cli("build", "--teacher", str(teacher), "--student", str(student), "--all", "--dtype", "fp16",
                  "--out", str(out))
    _assert_refused(result, out, "tensor 'model.layers.1.mlp.up_proj.weight' of the student holds inf")


def test_a_cast_to_fp16_refuses_a_value_beyond_its_range(copied_pair):
    teacher, student, out = copied_pair
    _with_bad_value(teacher, 1e6)
    result = _cli("build", "--teacher", str(teacher), "--student", str(student), "--keep", "0", "--dtype", "fp16",
                  "--out", str(out))
    _assert_refused(result, out, f"tensor '{TENSOR}' of the teacher holds 1e+06 at element 5, beyond the range of F16")
    fits = _cli("build", "--teacher", str(teacher), "--student", str(student), "--keep", "0", "--dtype", "bf16",
                "--out", str(out))
    assert fits.returncode == 0, fits.stderr


def test_init_student_dtype_refuses_a_non_finite_teacher_tensor(copied_pair):
    teacher, _, out = copied_pair
    _with_bad_value(teacher, math.nan)
    result = _cli("init-student", "--teacher", str(teacher), "--out", str(out), "--dtype", "bf16")
    _assert_refused(result, out, f"tensor '{TENSOR}' of the teacher holds NaN")


def test_json_text_writes_null_for_values_that_are_not_finite():
    data = {"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf}], "d": (2, "x"), "e": None}

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(dumps(data), parse_constant=refuse) == {"a": None, "b": [1.5, None, {"c": None}],
                                                             "d": [2, "x"], "e": None}


def test_a_sealed_record_never_holds_nan(tmp_path):
    write_sealed(tmp_path / "r.json", {"similarity": math.nan, "n": 3})
    assert "NaN" not in (tmp_path / "r.json").read_text()
    record, problem = read_sealed(tmp_path / "r.json")
    assert problem is None and record["similarity"] is None and record["n"] == 3
