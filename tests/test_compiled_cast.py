"""The compiled F32 -> BF16 cast (checkpoint/_fastcast.c): torch's bytes from any
buffer, the numpy path where it is missing or switched off, and a user who is
told when a cast runs the slow way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ALIGNMENTS

from layersplice.checkpoint import cast

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPECTED = os.environ.get("LAYERSPLICE_EXPECT_NATIVE") == "1"  # set by .ci/run, where a compiler exists


@pytest.fixture()
def fastcast():
    module = cast.native()
    if module is None:
        if EXPECTED:
            pytest.fail("the compiled cast was not built, though LAYERSPLICE_EXPECT_NATIVE=1")
        pytest.skip("the compiled cast is not built here (no C compiler at install)")
    return module


def _f32_edges() -> np.ndarray:
    """Ties in both directions, carries into the exponent, every NaN kind, infinities, subnormals."""
    bits = np.array(
        [0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x3F80_8001, 0x7F7F_FFFF, 0x7F7F_8000, 0x0000_8000, 0x0001_8000,
         0x7F80_0000, 0xFF80_0000, 0x7FC0_0000, 0xFFC0_0000, 0x7F80_0001, 0xFF80_0001, 0x7FFF_FFFF, 0x8000_0000,
         0x0000_0001, 0x807F_FFFF],
        np.uint32,
    )
    rng = np.random.default_rng(7)
    return np.concatenate([bits.view(np.float32), rng.standard_normal(100_003).astype(np.float32) * 3e-3])


def _torch_bf16(values: np.ndarray) -> bytes:
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def test_the_compiled_cast_writes_the_bytes_torch_writes(fastcast):
    values = _f32_edges()
    output = bytearray(values.size * 2)
    assert fastcast.f32_to_bf16_checked(values.tobytes(), output) == (len(output), False)
    assert bytes(output) == _torch_bf16(values)


def test_the_compiled_cast_says_whether_every_output_is_finite_as_torch_finds_it(fastcast):
    """NaN and infinity in, and finite values that round past BF16's largest (0x7F7F8000 and up)."""
    edges = _f32_edges()[:18]
    spread = np.random.default_rng(3).integers(0x7F7F_0000, 0x7F80_0000, 4000, dtype=np.uint32).view(np.float32)
    for value in np.concatenate([edges, spread, -spread]):
        single = np.array([value], np.float32)
        expected = bool(torch.from_numpy(single).to(torch.bfloat16).isfinite().all())
        # one odd value inside a long finite run: the vectorized reduction must see it
        values = np.concatenate([np.full(1000, 0.5, np.float32), single, np.full(77, -0.25, np.float32)])
        assert fastcast.f32_to_bf16_checked(values.tobytes(), bytearray(2 * values.size))[1] == expected, hex(
            single.view(np.uint32)[0])


def test_the_compiled_cast_takes_buffers_at_any_address(fastcast):
    values = _f32_edges()
    source = memoryview(b"\0" + values.tobytes())[1:]  # odd addresses: not even 2-byte aligned
    output = bytearray(values.size * 2 + 3)
    fastcast.f32_to_bf16_checked(source, memoryview(output)[3:])
    assert bytes(output[3:]) == _torch_bf16(values)
    assert output[:3] == b"\0\0\0"  # nothing written outside the given range


@pytest.mark.parametrize(
    ("source", "output", "error", "words"),
    [
        (b"abcde", bytearray(4), ValueError, "whole number of float32s"),
        (b"abcdefgh", bytearray(3), ValueError, "need 4"),
        (b"abcd", b"xy", BufferError, "writable"),
    ],
)
def test_the_compiled_cast_refuses_buffers_that_do_not_fit(fastcast, source, output, error, words):
    with pytest.raises(error, match=words):
        fastcast.f32_to_bf16_checked(source, output)


def test_cast_objects_use_the_compiled_loop_for_f32_to_bf16_only(fastcast):
    assert cast.Cast("F32", "BF16").is_native
    assert not cast.Cast("F16", "BF16").is_native
    assert not cast.Cast("BF16", "F32").is_native


def test_layersplice_native_0_switches_the_compiled_cast_off():
    script = "from layersplice.checkpoint import cast; print(cast.native(), cast.Cast('F32', 'BF16').is_native)"
    env = {**os.environ, "LAYERSPLICE_NATIVE": "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["None", "False"]


def _build(pair, out: Path, env: dict[str, str], script: str = "") -> subprocess.CompletedProcess:
    args = ["build", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir), "--keep", "1",
            "--dtype", "bf16", "--out", str(out)]
    code = (
        "import sys\n"
        f"{script}\n"
        "from layersplice.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, **env})


def test_a_compiled_cast_build_gives_the_numpy_bytes_without_importing_numpy(tmp_path, checkpoints, fastcast):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    compiled = _build(pair, tmp_path / "compiled", {})
    numpy_path = _build(pair, tmp_path / "numpy", {"LAYERSPLICE_NATIVE": "0"})
    assert compiled.returncode == 0 and numpy_path.returncode == 0, compiled.stderr + numpy_path.stderr
    assert compiled.stdout.strip().splitlines()[-1] == "[]"
    assert numpy_path.stdout.strip().splitlines()[-1] == "['numpy']"
    assert "note:" not in compiled.stderr + numpy_path.stderr  # switched off on purpose: no nagging
    shards = sorted(p.name for p in (tmp_path / "compiled").glob("*.safetensors"))
    assert shards
    for name in shards:
        assert (tmp_path / "compiled" / name).read_bytes() == (tmp_path / "numpy" / name).read_bytes()


def test_a_cast_without_the_compiled_loop_says_how_to_get_it(tmp_path, checkpoints):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    missing = "import layersplice.checkpoint.cast as c; c.native = lambda: None"
    done = _build(pair, tmp_path / "out", {}, script=missing)
    assert done.returncode == 0, done.stderr
    note = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "C compiler" in note[0] and "reinstall" in note[0]


def test_version_says_whether_casts_run_compiled():
    out = {}
    for switch in ("1", "0"):
        env = {**os.environ, "LAYERSPLICE_NATIVE": switch}
        done = subprocess.run([sys.executable, "-m", "layersplice", "--version"], capture_output=True, text=True,
                              env=env, check=True)
        out[switch] = done.stdout
    assert out["0"].splitlines()[-1].startswith("F32 -> BF16 casts: numpy")
    assert out["1"].splitlines()[-1] == ("F32 -> BF16 casts: compiled" if cast.native() else out["0"].splitlines()[-1])
