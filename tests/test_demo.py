"""`layersplice demo` and what it must show on the trained fixture pair: every
interpolated size between student and teacher, perplexity falling with size,
and the distilled interpolation beating naive layer dropping at every
intermediate size."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from eval_support import requires_fixture_pair
from PIL import Image

from layersplice.cli import cli
from layersplice.plot import DPI, FIGURE_INCHES

DEMO_SECONDS = 120

pytestmark = requires_fixture_pair


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[dict, float, Path]:
    out = tmp_path_factory.mktemp("demo") / "out"
    started = time.perf_counter()
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--json"])
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout), seconds, out


def test_demo_finishes_in_two_minutes_and_says_where_everything_went(demo):
    summary, seconds, out = demo
    assert seconds < DEMO_SECONDS
    assert Path(summary["sizes_dir"]) == out / "sizes"
    assert (out / "sizes" / "manifest.json").is_file()
    assert [Path(p).parent for p in summary["checkpoints"]] == [out / "sizes"] * len(summary["checkpoints"])
    assert set(summary["files"]) == {"json", "csv", "png"}
    for path in summary["files"].values():
        assert Path(path).is_file() and Path(path).parent == out
    with Image.open(summary["files"]["png"]) as image:
        assert image.format == "PNG" and image.size == (int(FIGURE_INCHES[0] * DPI), int(FIGURE_INCHES[1] * DPI))
    assert json.loads(Path(summary["files"]["json"]).read_text())["sizes"] == summary["sizes"]


def test_every_interpolated_size_lies_between_student_and_teacher_and_improves_with_size(demo):
    sizes = demo[0]["sizes"]
    assert [s["role"] for s in sizes] == ["student"] + ["interpolated"] * (len(sizes) - 2) + ["teacher"]
    student, teacher = sizes[0]["perplexity"], sizes[-1]["perplexity"]
    for size in sizes[1:-1]:
        assert teacher < size["perplexity"] < student, size
    perplexities = [s["perplexity"] for s in sizes]
    assert perplexities == sorted(perplexities, reverse=True)
    layers = [s["layers"] for s in sizes]
    assert layers == sorted(set(layers))


def test_distillation_beats_naive_layer_dropping_at_every_intermediate_size(demo):
    margins = {s["layers"]: s["margin_vs_naive"] for s in demo[0]["sizes"] if s["role"] == "interpolated"}
    print("naive minus distilled perplexity by layers:", {k: round(v, 3) for k, v in margins.items()})
    assert all(margin > 0 for margin in margins.values()), margins
