"""Pairs across two families: a student distilled by others from a teacher of another family.

DistilBERT was initialised from BERT layers 0,2,4,7,9,11; with that alignment a
DistilBERT student and a BERT teacher interpolate like any boomerang pair. The
output is a model of the family of the model that gives the embeddings (BERT
when block 0 is patched, else DistilBERT), and its masked-LM logits equal those
of an in-memory splice of the two loaded models. Phi-3 and Llama show fused
projections (qkv_proj, gate_up_proj) cut into and built from split ones.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from family_models import load_model, outputs
from safetensors.torch import load_file, save_file
from safetensors_files import tensors_as_bytes
from splice_reference import kept_blocks_patched, splice_across

from layersplice.cli.main import cli

DISTILBERT_FROM_BERT = (0, 2, 4, 7, 9, 11)
ALIGN = ("--copied-teacher-layers", ",".join(map(str, DISTILBERT_FROM_BERT)))
LAST = len(DISTILBERT_FROM_BERT) - 1

BERT_CHOICES = {
    "student": (("--keep", "6"), set()),
    "teacher": (("--keep", "0"), set(range(6))),
    "blocks0": (("--blocks", "0"), {0}),
    "blocks5": (("--blocks", "5"), {LAST}),
    "blocks0,5": (("--blocks", "0,5"), {0, LAST}),
    "blocks2,3": (("--blocks", "2,3"), {2, 3}),
    "keep3-last": (("--keep", "3", "--order", "last"), kept_blocks_patched(3, 6, "last")),
    "keep3-first": (("--keep", "3", "--order", "first"), kept_blocks_patched(3, 6, "first")),
}


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def bert_pair(family_pair):
    return family_pair("bert-mlm", DISTILBERT_FROM_BERT, n_teacher=12, student_kind="distilbert", student_config_file=False)


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and torch.equal(got, want), f"max |diff| {(got - want).abs().max().item():.3g}"


def test_in_memory_cross_family_splices_are_all_different(bert_pair, ids):
    """The oracle has power: the ends are the two models, and the splices differ."""
    t, s = bert_pair.teacher, bert_pair.student
    _assert_same(outputs(splice_across(t, s, DISTILBERT_FROM_BERT, set()), ids), outputs(s, ids))
    _assert_same(outputs(splice_across(t, s, DISTILBERT_FROM_BERT, set(range(6))), ids), outputs(t, ids))
    seen = [outputs(splice_across(t, s, DISTILBERT_FROM_BERT, patched), ids) for _, patched in BERT_CHOICES.values()]
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1 :])


@pytest.mark.parametrize("choice", BERT_CHOICES)
def test_distilbert_bert_splice_mlm_logits_equal_in_memory_splice(bert_pair, build, ids, tmp_path, choice):
    options, patched = BERT_CHOICES[choice]
    out = build(bert_pair, tmp_path / "out", *ALIGN, *options)
    built = load_model(out)
    expected = splice_across(bert_pair.teacher, bert_pair.student, DISTILBERT_FROM_BERT, patched)
    assert type(built) is type(expected)
    _assert_same(outputs(built, ids), outputs(expected, ids))


@pytest.mark.parametrize(
    ("blocks", "family", "layer_key"),
    [("0", "bert", "num_hidden_layers"), ("5", "distilbert", "n_layers"), ("2,3", "distilbert", "n_layers")],
)
def test_output_takes_the_family_of_the_embeddings_model(bert_pair, build, tmp_path, blocks, family, layer_key):
    out = build(bert_pair, tmp_path / "out", *ALIGN, "--blocks", blocks)
    config = json.loads((out / "config.json").read_text())
    patched = {int(b) for b in blocks.split(",")}
    n_layers = 6 + sum((DISTILBERT_FROM_BERT + (12,))[b + 1] - DISTILBERT_FROM_BERT[b] - 1 for b in patched)
    assert config["model_type"] == family and config[layer_key] == n_layers
    prefix = "bert.encoder.layer." if family == "bert" else "distilbert.transformer.layer."
    layer_names = {n for n in tensors_as_bytes(out) if ".layer." in n}
    assert all(n.startswith(prefix) for n in layer_names) and {int(n[len(prefix):].split(".")[0]) for n in layer_names} == set(range(n_layers))


def test_the_mlm_head_comes_from_the_model_of_the_last_block(bert_pair, build, tmp_path):
    teacher, student = tensors_as_bytes(bert_pair.teacher_dir), tensors_as_bytes(bert_pair.student_dir)
    distil = tensors_as_bytes(build(bert_pair, tmp_path / "a", *ALIGN, "--blocks", "5"))  # DistilBERT names, BERT head
    assert distil["vocab_transform.weight"] == teacher["cls.predictions.transform.dense.weight"]
    assert distil["vocab_projector.bias"] == teacher["cls.predictions.bias"]
    assert distil["vocab_projector.weight"] == teacher["bert.embeddings.word_embeddings.weight"]
    bert = tensors_as_bytes(build(bert_pair, tmp_path / "b", *ALIGN, "--blocks", "0"))  # BERT names, DistilBERT head
    assert bert["cls.predictions.transform.LayerNorm.weight"] == student["vocab_layer_norm.weight"]
    assert bert["cls.predictions.decoder.weight"] == student["distilbert.embeddings.word_embeddings.weight"]
    assert bert["cls.predictions.decoder.bias"] == bert["cls.predictions.bias"] == student["vocab_projector.bias"]


def test_a_bert_teacher_with_legacy_layer_norm_names_pairs_too(bert_pair, build, ids, tmp_path):
    """bert-base-uncased's own files spell LayerNorm weights gamma/beta; transformers reads them as weight/bias."""
    legacy = tmp_path / "legacy-teacher"
    shutil.copytree(bert_pair.teacher_dir, legacy)
    tensors = load_file(legacy / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    pair = type(bert_pair)(legacy, bert_pair.student_dir, bert_pair.copied, bert_pair.teacher, bert_pair.student)
    for blocks in ("0", "5", "0,2"):
        patched = {int(b) for b in blocks.split(",")}
        built = load_model(build(pair, tmp_path / blocks, *ALIGN, "--blocks", blocks))
        expected = splice_across(bert_pair.teacher, bert_pair.student, DISTILBERT_FROM_BERT, patched)
        _assert_same(outputs(built, ids), outputs(expected, ids))


PHI3_CHOICES = {"blocks0": {0}, "blocks3": {3}, "blocks1,2": {1, 2}, "all": {0, 1, 2, 3}}


@pytest.mark.parametrize("choice", PHI3_CHOICES)
@pytest.mark.parametrize(("teacher", "student"), [("llama", "phi3"), ("phi3", "llama")])
def test_fused_and_split_projections_pair_phi3_with_llama(family_pair, build, ids, tmp_path, teacher, student, choice):
    pair = family_pair(teacher, (0, 1, 3, 5), student_kind=student, student_config_file=False)
    patched = PHI3_CHOICES[choice]
    out = build(pair, tmp_path / "out", "--copied-teacher-layers", "0,1,3,5", "--blocks", ",".join(map(str, sorted(patched))))
    expected = splice_across(pair.teacher, pair.student, (0, 1, 3, 5), patched)
    _assert_same(outputs(load_model(out), ids), outputs(expected, ids))


def test_split_projections_are_row_ranges_of_the_fused_tensor(family_pair, build, tmp_path):
    pair = family_pair("phi3", (0, 1, 3, 5), student_kind="llama", student_config_file=False)
    out = tensors_as_bytes(build(pair, tmp_path / "out", "--copied-teacher-layers", "0,1,3,5", "--blocks", "1"))
    _, shape, qkv = tensors_as_bytes(pair.teacher_dir)["model.layers.1.self_attn.qkv_proj.weight"]
    q, k, v = (out[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")  # a Llama output: student embeddings
    assert q[2] + k[2] + v[2] == qkv
    assert (q[1][0] + k[1][0] + v[1][0], q[1][1]) == shape


def _build_error(pair, tmp_path, *options) -> str:
    result = CliRunner().invoke(cli, ["build", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir), "--out", str(tmp_path / "out"), *options])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "out").exists()
    return " ".join(result.output.split())


def test_different_hidden_sizes_cannot_be_mapped(family_pair, tmp_path, monkeypatch):
    import family_models

    wide = family_models.Kind(
        lambda n: family_models.DistilBertConfig(vocab_size=128, dim=48, n_layers=n, n_heads=4, hidden_dim=64, max_position_embeddings=64),
        family_models.AutoModelForMaskedLM,
    )
    monkeypatch.setitem(family_models.KINDS, "distilbert-wide", wide)
    pair = family_pair("bert-mlm", DISTILBERT_FROM_BERT, n_teacher=12, student_kind="distilbert-wide", student_config_file=False)
    message = _build_error(pair, tmp_path, *ALIGN, "--keep", "3")
    assert "hidden sizes differ" in message and "bert" in message and "distilbert" in message


def test_a_pooler_has_no_counterpart_in_distilbert(family_pair, tmp_path):
    pair = family_pair("bert", DISTILBERT_FROM_BERT, n_teacher=12, student_kind="distilbert", student_config_file=False)
    message = _build_error(pair, tmp_path, *ALIGN, "--keep", "3")
    assert "pooler.dense" in message and "no counterpart" in message


def test_families_that_map_into_different_families_do_not_pair(family_pair, tmp_path):
    pair = family_pair("bert-mlm", (0, 1, 3, 5), student_kind="llama", student_config_file=False)
    message = _build_error(pair, tmp_path, "--copied-teacher-layers", "0,1,3,5", "--keep", "3")
    assert "same family" in message and "names_as" in message


@pytest.mark.parametrize("dtype", [None, "bf16"])
@pytest.mark.parametrize("blocks", ["0", "1"])  # a Llama output cuts Phi-3 tensors; a Phi-3 output fuses Llama's
def test_verify_against_sources_checks_every_row_range(family_pair, build, tmp_path, blocks, dtype):
    pair = family_pair("llama", (0, 1, 3, 5), student_kind="phi3", student_config_file=False)
    cast = ("--dtype", dtype) if dtype else ()
    out = build(pair, tmp_path / "out", "--copied-teacher-layers", "0,1,3,5", "--blocks", blocks, *cast)
    result = CliRunner().invoke(cli, ["verify", str(out), "--against-sources"])
    assert result.exit_code == 0, result.output
