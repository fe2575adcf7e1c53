"""`layersplice demo` and what it must show on the trained fixture pair: every
interpolated size between student and teacher (at least six of them), a real
student-teacher gap, perplexity falling with size,
the distilled interpolation beating naive layer dropping at every
intermediate size, and a plot axis that grows with every size. The demo
patches, at each size, the blocks of the better of --order kl and --order
search on its calibration text (bench/RESULTS.md, orders and search orders)."""

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
    assert summary["order"]["order"] in ("kl", "search")
    provenance = json.loads((Path(summary["checkpoints"][1]) / "layersplice.json").read_text())
    assert {k: v for k, v in provenance["choice"].items() if k not in ("keep", "layers")} == summary["order"]


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


def test_the_demo_uses_the_search_whose_every_size_is_at_least_as_close_to_the_teacher_as_greedy_kls(demo):
    """On the calibration text the search's sets are never worse than greedy's, so the demo takes them.
    The demo's search is the beam at every size, within the greedy order's uncached cost."""
    order = demo[0]["order"]
    assert order["order"] == "search"
    search = order["search"]
    budget = search["budget_mean_kl"]
    print("mean KL to the teacher over sizes:", budget)
    assert budget["search"] <= budget["greedy"]
    assert [s["layers"] for s in search["sizes"]] == list(range(10, 16))
    assert all(s["kl"] <= s["greedy_kl"] and s["method"] == "beam" for s in search["sizes"])
    cost = search["layer_forwards"]
    assert cost["spent"] <= cost["greedy_without_cache"]
    assert sum(s["kl"] < s["greedy_kl"] for s in search["sizes"]) == 6
    assert search["calibration"]["path"].endswith("calibration.jsonl")


def test_on_held_out_text_the_search_beats_greedy_kl_by_at_least_1_percent_on_average(demo):
    """Issue 23: search against greedy kl, held-out perplexity per size on the demo's texts.

    Measured: better at 10-14 layers, mean gain 1.01 %, but 0.19 % worse at 15 layers (99.97 against 99.78):
    there the lowest calibration KL patches one-layer block 7 too, and KL and perplexity disagree
    (bench/RESULTS.md, search orders). This test pins what holds; the 15-layer size is reported, not hidden."""
    import torch

    from layersplice.cli.eval_commands import MAX_TOKENS, SEQ_LEN
    from layersplice.evaluation.in_memory import LoadedPair
    from layersplice.evaluation.perplexity import evaluate_sizes, load_text, load_tokenizer
    from layersplice.planning.job import open_job
    from layersplice.planning.plan import make_plan

    summary = demo[0]
    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    job = open_job(str(fixtures / "tiny-teacher"), str(fixtures / "tiny-student"), [])
    loaded = LoadedPair(job, torch.device("cpu"), torch.float32)
    text = load_text(Path(summary["held_out"]), load_tokenizer(fixtures / "tiny-teacher"), SEQ_LEN, MAX_TOKENS)
    greedy = {s["layers"]: make_plan(job.pair, frozenset(s["greedy_patched_blocks"]))
              for s in summary["order"]["search"]["sizes"]}
    measured = evaluate_sizes([(None, plan) for plan in greedy.values()], 9, loaded.model, None, text, 8,
                              torch.device("cpu"))
    greedy_ppl = {r.layers: r.perplexity for r in measured}
    search_ppl = {s["layers"]: s["perplexity"] for s in summary["sizes"] if s["role"] == "interpolated"}
    gains = {n: 100 * (greedy_ppl[n] - search_ppl[n]) / greedy_ppl[n] for n in greedy_ppl}
    print("held-out perplexity by layers, greedy kl -> search:",
          {n: f"{greedy_ppl[n]:.2f} -> {search_ppl[n]:.2f} ({gains[n]:+.2f} %)" for n in gains})
    assert sum(gains.values()) / len(gains) >= 1.0
    assert sum(gain > 0 for gain in gains.values()) >= 5
