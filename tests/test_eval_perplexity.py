"""`eval`: models assembled in memory are the models `build` writes, perplexity
is token-weighted over windows, and the outputs (table, JSON, CSV, PNG) are there."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from click.testing import CliRunner
from eval_support import eval_pair, one_torch_thread  # noqa: F401 - fixtures
from PIL import Image
from splice_reference import assemble, load_causal_lm, logits

from layersplice.cli.main import cli
from layersplice.evaluation.in_memory import LoadedPair, SharedLayers
from layersplice.evaluation.perplexity import load_text, load_tokenizer, negative_log_likelihood
from layersplice.evaluation.plot import DPI, FIGURE_INCHES
from layersplice.planning.job import open_job
from layersplice.planning.plan import make_plan

CPU = torch.device("cpu")


def run(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def loaded(pair) -> LoadedPair:
    return LoadedPair(open_job(str(pair.teacher), str(pair.student), []), CPU, torch.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_in_memory_splice_is_the_model_build_writes_and_copies_no_weight(eval_pair, build, checkpoints, tmp_path, input_ids, arch):
    pair = eval_pair(arch)
    family = loaded(pair)
    for blocks in ("1", "3", "0,2"):
        patched = frozenset(int(b) for b in blocks.split(","))
        model = family.splice(patched)
        written = load_causal_lm(build(checkpoints(arch, pair.copied), tmp_path / blocks, "--blocks", blocks))
        torch.testing.assert_close(logits(model, input_ids), logits(written, input_ids), rtol=1e-5, atol=1e-5)
        sources = {t.data_ptr() for tensors in (family.tensors("teacher"), family.tensors("student")) for t in tensors.values()}
        assert {p.data_ptr() for p in model.parameters()} <= sources


@pytest.mark.parametrize("arch,kept", [("llama", 64), ("llama", 1), ("llama-tied", 64), ("mistral", 64),
                                       ("qwen3", 64), ("gemma3", 64), ("gpt2", 64)])
def test_models_sharing_their_layers_are_each_the_model_build_writes(eval_pair, build, checkpoints, tmp_path, input_ids,
                                                                    monkeypatch, arch, kept):
    """Every set of blocks at once (the models alive together, as a search's round holds them), then each
    against what `build` writes for it: sharing a decoder layer changes no model, whatever else ran, and
    neither does dropping the layers of configs past the bound (kept 1: every new config drops the last)."""
    monkeypatch.setattr(SharedLayers, "KEPT", kept)
    pair = eval_pair(arch)
    family = loaded(pair)
    sets = [frozenset(b for b in range(4) if bits >> b & 1) for bits in range(16)]
    models = {s: family.model(make_plan(family.job.pair, s), shared=True) for s in sets}
    layers = {s: list(m.get_submodule(family.job.pair.layout("teacher").prefix)) for s, m in models.items()}
    if arch in ("llama", "mistral") and kept > 1:  # no per-layer lists and an untied head: one config per size
        # {1} and {1, 2} have 5 layers each and differ only in the fourth (student layer 2, teacher layer 4).
        first, other = layers[frozenset({1})], layers[frozenset({1, 2})]
        assert [a is b for a, b in zip(first, other)] == [True, True, True, False, True]
    for s in sets[::-1]:
        blocks = ",".join(map(str, sorted(s))) or "none"
        options = ("--blocks", blocks) if s else ("--keep", "4")
        written = load_causal_lm(build(checkpoints(arch, pair.copied), tmp_path / blocks, *options))
        torch.testing.assert_close(logits(models[s], input_ids), logits(written, input_ids), rtol=1e-5, atol=1e-5)


def test_naive_baseline_is_the_teacher_with_the_same_layers_and_no_student_weight(eval_pair, checkpoints, input_ids):
    pair = eval_pair("llama")
    teacher = checkpoints("llama", pair.copied).teacher
    patched = frozenset({1})
    # Blocks [0,2) [2,4) [4] [5]: block 1 patched keeps teacher layers 0, 2, 3, 4, 5.
    expected = assemble(teacher, [(teacher, j) for j in (0, 2, 3, 4, 5)], teacher, teacher)
    naive = loaded(pair).naive(patched)
    torch.testing.assert_close(logits(naive, input_ids), logits(expected, input_ids), rtol=1e-5, atol=1e-5)


def test_perplexity_weights_every_predicted_token_the_same_whatever_the_batching(eval_pair):
    pair = eval_pair("llama")
    tokenizer = load_tokenizer(pair.teacher)
    text = load_text(pair.text, tokenizer, seq_len=48, max_tokens=1000)
    model = load_causal_lm(pair.teacher)
    # By hand: each window predicts its tokens after the first; the last window is shorter.
    ids = text.windows.ids.flatten()[: text.tokens]
    total, count = 0.0, 0
    for window in ids.split(48):
        with torch.no_grad():
            out = model(input_ids=window[None]).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(out, window[1:], reduction="sum"))
        count += len(window) - 1
    for batch_size in (1, 3, 64):
        nll, n = negative_log_likelihood(model, text, batch_size, CPU)
        assert n == count == 1000 - math.ceil(1000 / 48)
        assert nll == pytest.approx(total, rel=1e-5)


def test_eval_writes_table_json_csv_and_a_png_with_the_naive_baseline(eval_pair, tmp_path):
    pair = eval_pair("llama")
    out = tmp_path / "eval"
    result = run("eval", *pair.args(), "--data", str(pair.text), "--baseline", "naive", "--seq-len", "64",
                 "--max-tokens", "1500", "--out", str(out))
    assert "naive dropping" in result.output and "margin" in result.output
    report = json.loads((out / "eval.json").read_text())
    roles = [size["role"] for size in report["sizes"]]
    assert roles[0] == "student" and roles[-1] == "teacher" and "interpolated" in roles
    layers = [size["layers"] for size in report["sizes"]]
    assert layers == sorted(layers) and len(set(layers)) == len(layers)
    for size in report["sizes"]:
        assert size["perplexity"] > 1 and size["naive_perplexity"] > 1
        assert size["margin_vs_naive"] == pytest.approx(size["naive_perplexity"] - size["perplexity"])
        assert size["naive_parameters"] == size["parameters"]  # untied: same tensors, other weights
    assert report["sizes"][-1]["naive_perplexity"] == report["sizes"][-1]["perplexity"]  # naive teacher = teacher
    assert report["data"]["tokens"] == 1500 and report["baseline"] == "naive" and report["order"] == {"order": "last"}
    with (out / "eval.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["layers"]) for r in rows] == layers
    with Image.open(out / "eval.png") as image:
        image.verify()
    with Image.open(out / "eval.png") as image:
        assert image.format == "PNG"
        assert image.size == (int(FIGURE_INCHES[0] * DPI), int(FIGURE_INCHES[1] * DPI))


def test_eval_of_a_build_all_output_gives_the_in_memory_numbers(eval_pair, tmp_path):
    pair = eval_pair("llama")
    run("build", *pair.args(), "--all", "--out", str(tmp_path / "sizes"))
    common = ["eval", *pair.args(), "--data", str(pair.text), "--seq-len", "64", "--max-tokens", "800"]
    run(*common, "--out", str(tmp_path / "memory"))
    run(*common, "--models", str(tmp_path / "sizes"), "--out", str(tmp_path / "files"))
    memory, files = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("memory", "files"))
    assert [s["layers"] for s in memory["sizes"]] == [s["layers"] for s in files["sizes"]]
    for a, b in zip(memory["sizes"], files["sizes"]):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
    assert files["models"] == str(tmp_path / "sizes")


def test_eval_sizes_takes_keep_values(eval_pair, tmp_path):
    pair = eval_pair("llama")
    run("eval", *pair.args(), "--data", str(pair.text), "--sizes", "4,1", "--max-tokens", "300",
        "--seq-len", "64", "--out", str(tmp_path))
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [(s["keep"], s["layers"]) for s in report["sizes"]] == [(4, 4), (1, 5)]


@pytest.mark.parametrize("args, message", [
    ((), "--data FILE"),
    (("--data", "{text}", "--sizes", "two"), "--sizes"),
    (("--data", "{text}", "--sizes", "9"), "--keep 9 is out of range"),
    (("--data", "{text}", "--models", "{empty}"), "build --all"),
])
def test_eval_input_errors_are_one_line(eval_pair, tmp_path, args, message):
    pair = eval_pair("llama")
    (tmp_path / "empty").mkdir()
    filled = [a.format(text=pair.text, empty=tmp_path / "empty") for a in args]
    result = CliRunner().invoke(cli, ["eval", *pair.args(), *filled, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_non_embedding_parameters_grow_with_layers_even_where_the_full_count_zigzags(eval_pair, tmp_path):
    # A tied pair: an interpolated size with the student's embeddings and the
    # teacher's head stores an untied head (one more vocabulary matrix), which
    # can make its full count exceed a larger size's; the count without
    # embeddings and head follows the layers alone.
    pair = eval_pair("llama-tied")
    run("eval", *pair.args(), "--data", str(pair.text), "--max-tokens", "300", "--seq-len", "64", "--out", str(tmp_path))
    sizes = json.loads((tmp_path / "eval.json").read_text())["sizes"]
    vocab, hidden, inner, heads, kv_heads = 128, 32, 64, 4, 2  # conftest._SIZES, worked by hand
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * inner + 2 * hidden
    for size in sizes:
        assert size["non_embedding_parameters"] == size["layers"] * per_layer + hidden  # + the final norm
    ends = {size["parameters"] - size["non_embedding_parameters"] for size in sizes}
    assert ends == {vocab * hidden, 2 * vocab * hidden}  # tied sizes, and the untied ones in between
    core = [size["non_embedding_parameters"] for size in sizes]
    assert core == sorted(set(core))
