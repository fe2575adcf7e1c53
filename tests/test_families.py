"""Every described family beyond the core decoders builds the splice METHOD.md §4 describes.

Mixture-of-experts (per-expert and fused expert tensors), Gemma and Gemma 2,
Phi-3, and encoders (BertModel with its pooler, BertForMaskedLM, DistilBERT):
a built directory, loaded with its Auto class, gives outputs bit-identical to
an in-memory splice of the loaded modules (splice_reference.py).
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from family_models import KINDS, load_model, outputs
from safetensors_files import tensors_as_bytes
from splice_reference import kept_blocks_patched, splice

COPIED = (0, 1, 3, 5)  # blocks [0], [1, 2], [3, 4], [5]
FAMILIES = ["mixtral", "mixtral-fused", "qwen3_moe", "gemma", "gemma2", "phi3", "bert", "bert-mlm", "distilbert"]
TIED = ["gemma", "bert-mlm", "distilbert"]
LAST = len(COPIED) - 1


def _choices() -> dict[str, tuple[tuple[str, ...], frozenset[int]]]:
    choices = {
        "student": (("--keep", str(len(COPIED))), frozenset()),
        "teacher": (("--keep", "0"), frozenset(range(len(COPIED)))),
    }
    for order in ("last", "first"):
        choices[f"keep2-{order}"] = (("--keep", "2", "--order", order), frozenset(kept_blocks_patched(2, len(COPIED), order)))
    for subset in ((0,), (LAST,), (1, 2), (0, 2)):
        text = ",".join(map(str, subset))
        choices[f"blocks{text}"] = (("--blocks", text), frozenset(subset))
    return choices


CHOICES = _choices()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, KINDS["gemma"].config(1).vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_in_memory_splices_of_a_family_are_all_different(family_pair, ids, family):
    """The oracle has power: no patch is the student, all is the teacher, every splice differs."""
    pair = family_pair(family, COPIED)
    everything = set(range(len(COPIED)))
    assert torch.equal(outputs(splice(pair.teacher, pair.student, COPIED, set()), ids), outputs(pair.student, ids))
    assert torch.equal(outputs(splice(pair.teacher, pair.student, COPIED, everything), ids), outputs(pair.teacher, ids))
    seen = [
        outputs(splice(pair.teacher, pair.student, COPIED, set(subset)), ids)
        for size in range(len(COPIED) + 1)
        for subset in itertools.combinations(range(len(COPIED)), size)
    ]
    for a, b in itertools.combinations(range(len(seen)), 2):
        assert not torch.equal(seen[a], seen[b]), f"splices {a} and {b} of {family} are indistinguishable"


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_built_outputs_equal_in_memory_splice(family_pair, build, ids, tmp_path, family, choice):
    pair = family_pair(family, COPIED)
    options, patched = CHOICES[choice]
    built = load_model(build(pair, tmp_path / "out", *options))
    assert type(built) is type(pair.teacher)
    expected = splice(pair.teacher, pair.student, COPIED, set(patched))
    got, want = outputs(built, ids), outputs(expected, ids)
    assert torch.equal(got, want), f"max |diff| {(got - want).abs().max().item():.3g}"


@pytest.mark.parametrize("family", ["mixtral", "mixtral-fused", "qwen3_moe"])
def test_every_expert_tensor_travels_with_its_layer(family_pair, build, tmp_path, family):
    pair = family_pair(family, COPIED)
    out = build(pair, tmp_path / "out", "--blocks", "1")  # layers: s0, t1, t2, s2, s3
    written, teacher, student = (tensors_as_bytes(d) for d in (out, pair.teacher_dir, pair.student_dir))
    sources = [(student, 0), (teacher, 1), (teacher, 2), (student, 2), (student, 3)]
    for index, (model, layer) in enumerate(sources):
        expected = {k.replace(f"layers.{layer}.", f"layers.{index}.", 1): v for k, v in model.items() if f"layers.{layer}." in k}
        got = {k: v for k, v in written.items() if f"layers.{index}." in k}
        assert got == expected
        assert any("experts" in name for name in got) == ("experts" in "".join(expected)), index


def test_qwen3_moe_keeps_each_layers_experts_or_dense_mlp_in_the_config(family_pair, build, tmp_path):
    """Teacher: step 2 with layer 3 listed, so experts in layers 1 and 5 only."""
    pair = family_pair("qwen3_moe", COPIED)
    out = build(pair, tmp_path / "out", "--blocks", "1,2")  # s0, t1, t2, t3, t4, s3
    config = json.loads((out / "config.json").read_text())
    assert config["decoder_sparse_step"] == 1
    assert config["mlp_only_layers"] == [0, 2, 3, 4]


def test_gemma2_takes_each_layers_attention_type_from_its_source(family_pair, build, tmp_path):
    pair = family_pair("gemma2", COPIED)
    out = build(pair, tmp_path / "out", "--blocks", "1,2")
    types = pair.teacher.config.layer_types
    assert json.loads((out / "config.json").read_text())["layer_types"] == [types[i] for i in (0, 1, 2, 3, 4, 5)]


@pytest.mark.parametrize("order", ["last", "first"])
@pytest.mark.parametrize("family", TIED)
def test_tied_head_from_the_other_model_is_written_untied(family_pair, build, tmp_path, family, order):
    pair = family_pair(family, COPIED)
    out = build(pair, tmp_path / "out", "--keep", "2", "--order", order)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    head_source = tensors_as_bytes(pair.teacher_dir if order == "last" else pair.student_dir)
    written = tensors_as_bytes(out)
    embedding = next(name for name in head_source if name.endswith("word_embeddings.weight") or name.endswith("embed_tokens.weight"))
    head = {"gemma": "lm_head.weight", "bert-mlm": "cls.predictions.decoder.weight", "distilbert": "vocab_projector.weight"}[family]
    assert written[head] == head_source[embedding]
    if family == "bert-mlm":  # transformers unties the decoder bias too
        assert written["cls.predictions.decoder.bias"] == head_source["cls.predictions.bias"]


def test_bert_pooler_travels_with_the_last_block(family_pair, build, tmp_path):
    pair = family_pair("bert", COPIED)
    teacher = tensors_as_bytes(pair.teacher_dir)
    for blocks, source in (("0", tensors_as_bytes(pair.student_dir)), (str(LAST), teacher)):
        written = tensors_as_bytes(build(pair, tmp_path / blocks, "--blocks", blocks))
        assert written["pooler.dense.weight"] == source["pooler.dense.weight"]
        assert written["embeddings.word_embeddings.weight"] == (teacher if blocks == "0" else tensors_as_bytes(pair.student_dir))["embeddings.word_embeddings.weight"]
