"""`layersplice demo` and what it must show on the trained fixture pair: every
interpolated size between student and teacher (at least six of them), a real
student-teacher gap, perplexity falling with size,
the distilled interpolation beating naive layer dropping at every
intermediate size, and a plot axis that grows with every size. The demo
patches blocks in the --order kl order (bench/RESULTS.md, orders, compares it
with last and first)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from eval_support import one_torch_thread  # noqa: F401 - restores the thread count the demo sets
from PIL import Image

from layersplice.cli.main import cli
from layersplice.evaluation.plot import DPI, FIGURE_INCHES


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout), out


def test_demo_says_where_everything_went(demo):
    """Its wall time is a benchmark, not a test: bench/demo_time.py, bench/RESULTS.md."""
    summary, out = demo
    assert Path(summary["sizes_dir"]) == out / "sizes"
    assert (out / "sizes" / "manifest.json").is_file()
    assert [Path(p).parent for p in summary["checkpoints"]] == [out / "sizes"] * len(summary["checkpoints"])
    assert set(summary["files"]) == {"json", "csv", "png"}
    for path in summary["files"].values():
        assert Path(path).is_file() and Path(path).parent == out
    with Image.open(summary["files"]["png"]) as image:
        assert image.format == "PNG" and image.size == (int(FIGURE_INCHES[0] * DPI), int(FIGURE_INCHES[1] * DPI))
    assert json.loads(Path(summary["files"]["json"]).read_text())["sizes"] == summary["sizes"]
    assert summary["order"]["order"] == "kl" and sorted(summary["order"]["patch_order"]) == list(range(9))  # the 9 student layers' blocks
    provenance = json.loads((Path(summary["checkpoints"][1]) / "layersplice.json").read_text())
    assert provenance["choice"]["patch_order"] == summary["order"]["patch_order"]


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


def test_the_plot_axis_grows_with_every_size_and_the_summary_states_gap_and_margin(demo):
    summary = demo[0]
    core = [s["non_embedding_parameters"] for s in summary["sizes"]]
    assert core == sorted(set(core))
    student, teacher = summary["sizes"][0]["perplexity"], summary["sizes"][-1]["perplexity"]
    margins = {s["layers"]: s["margin_vs_naive"] for s in summary["sizes"] if s["role"] == "interpolated"}
    smallest = min(margins, key=margins.get)
    lines = "\n".join(summary["summary"])
    assert f"the student's is {student / teacher:.2f}x the teacher's" in lines
    assert f"smallest margin {margins[smallest]:+.3f} perplexity (at {smallest} layers)" in lines


def test_the_fixture_family_has_many_sizes_a_real_gap_and_layers_that_matter(demo):
    """The fixture's conditions (fixtures/make_tiny_pair.py): at least six intermediate sizes, a distilled
    student at least 1.15x the teacher's perplexity, and naive dropping to the student's size at least 1.5x."""
    sizes = demo[0]["sizes"]
    teacher = sizes[-1]["perplexity"]
    assert sum(s["role"] == "interpolated" for s in sizes) >= 6
    assert sizes[0]["perplexity"] >= 1.15 * teacher
    assert sizes[0]["naive_perplexity"] >= 1.5 * teacher


def test_distillation_beats_naive_layer_dropping_at_every_intermediate_size(demo):
    margins = {s["layers"]: s["margin_vs_naive"] for s in demo[0]["sizes"] if s["role"] == "interpolated"}
    print("naive minus distilled perplexity by layers:", {k: round(v, 3) for k, v in margins.items()})
    assert all(margin > 0 for margin in margins.values()), margins


def test_the_kl_order_is_never_worse_than_the_better_of_first_and_last_on_the_calibration_text(demo):
    kl_order = demo[0]["order"]["kl_order"]
    budget = kl_order["budget_mean_kl"]
    print("mean KL to the teacher over sizes:", budget, "chosen from", kl_order["chosen_from"])
    assert budget[kl_order["chosen_from"]] <= min(budget["first"], budget["last"])
    assert kl_order["calibration"]["path"].endswith("calibration.jsonl")
