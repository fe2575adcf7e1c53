"""--order kl: greedy by KL to the teacher, never worse than first or last on the
calibration text, recorded in layersplice.json and reusable with --order-file."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from eval_support import eval_pair, one_torch_thread  # noqa: F401 - fixtures

from layersplice.cli.main import cli
from layersplice.evaluation.in_memory import LoadedPair
from search_support import Reference

from layersplice.evaluation.kl_order import budget_mean_kl, choose_kl_order
from layersplice.evaluation.perplexity import load_text, load_tokenizer
from layersplice.planning.job import open_job

CPU = torch.device("cpu")
ORDERS = ("greedy", "first", "last")


@pytest.fixture(scope="module")
def calibration(eval_pair):
    pair = eval_pair("llama")
    loaded = LoadedPair(open_job(str(pair.teacher), str(pair.student), []), CPU, torch.float32)
    text = load_text(pair.text, load_tokenizer(pair.teacher), seq_len=64, max_tokens=1024)
    return pair, loaded, text


@pytest.fixture(scope="module")
def chosen(calibration):
    _, loaded, text = calibration
    return choose_kl_order(loaded, text)


def test_each_greedy_step_patches_the_block_with_the_lowest_kl(calibration, chosen):
    pair, _, text = calibration
    reference = Reference(pair, text, batch_size=4)  # whole nn.Module splices, each from its first layer
    patched: set[int] = set()
    for block in chosen.greedy[:-1]:
        candidates = [b for b in range(4) if b not in patched]
        kls = reference.kl([frozenset(patched | {b}) for b in candidates])
        assert candidates[kls.index(min(kls))] == block
        patched.add(block)
    assert sorted(chosen.greedy) == [0, 1, 2, 3]


def test_kl_order_is_never_worse_than_the_better_of_first_and_last(chosen):
    budget = chosen.budget_kl
    assert set(budget) == set(ORDERS)
    assert budget[chosen.chosen_from] <= min(budget["first"], budget["last"])
    for name in ORDERS:
        curve = chosen.kl_curves[name]
        assert curve[-1] == 0.0 and curve[0] == chosen.kl_curves["greedy"][0]


def test_budget_mean_kl_weights_each_model_by_the_parameters_it_is_the_best_buy_for():
    # 10 -> 20 params costs KL 1.0, 20 -> 40 costs 0.5: (1.0 * 10 + 0.5 * 20) / 30.
    assert budget_mean_kl([1.0, 0.5, 0.0], [10, 20, 40]) == pytest.approx(20 / 30)
    # A block that adds no parameter adds no width.
    assert budget_mean_kl([1.0, 0.7, 0.0], [10, 10, 40]) == pytest.approx(0.7)


def test_order_kl_goes_into_layersplice_json_and_order_file_reuses_it(calibration, tmp_path):
    pair, _, _ = calibration
    first = tmp_path / "kl"
    args = ["build", *pair.args(), "--order", "kl", "--calib", str(pair.text), "--keep", "2"]
    result = CliRunner().invoke(cli, [*args, "--out", str(first)])
    assert result.exit_code == 0, result.output
    assert "patch order: blocks" in result.stderr
    choice = json.loads((first / "layersplice.json").read_text())["choice"]
    assert choice["order"] == "kl" and sorted(choice["patch_order"]) == [0, 1, 2, 3]
    assert choice["kl_order"]["chosen_from"] in ORDERS
    reused = tmp_path / "reused"
    again = ["build", *pair.args(), "--order-file", str(first / "layersplice.json"), "--keep", "2", "--out", str(reused)]
    result = CliRunner().invoke(cli, again)
    assert result.exit_code == 0, result.output
    provenance = json.loads((reused / "layersplice.json").read_text())
    assert provenance["choice"]["patch_order"] == choice["patch_order"]
    assert provenance["patched_blocks"] == sorted(choice["patch_order"][:2])
    assert (reused / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()


@pytest.mark.parametrize("options, message", [
    (("--order", "kl"), "--calib FILE"),
    (("--calib", "{text}"), "--order kl"),
    (("--order-file", "{bad}"), "patch_order"),
    (("--order-file", "{short}"), "exactly once"),
])
def test_kl_order_input_errors_are_one_line(calibration, tmp_path, options, message):
    pair, _, _ = calibration
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "short.json").write_text('{"patch_order": [0, 1]}')
    filled = [o.format(text=pair.text, bad=tmp_path / "bad.json", short=tmp_path / "short.json") for o in options]
    result = CliRunner().invoke(cli, ["plan", *pair.args(), *filled])
    assert result.exit_code == 2 and message in result.output, result.output

