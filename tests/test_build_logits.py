"""`layersplice build` writes the model METHOD.md §4 describes.

The built directory, loaded by transformers, must give logits bit-identical to
an in-memory splice of the loaded teacher and student modules
(splice_reference.py) for every family, alignment and choice of blocks.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ALIGNMENTS, ARCHITECTURES, N_TEACHER
from safetensors.torch import load_file, save_file
from safetensors_files import tensors_as_bytes
from splice_reference import (
    blocks,
    kept_blocks_patched,
    load_causal_lm,
    logits,
    patch_order_prefixes,
    reference_patch,
    splice,
)

ARCHS = list(ARCHITECTURES)
TIED_ARCHS = [arch for arch in ARCHS if ARCHITECTURES[arch]().tie_word_embeddings]
N_STUDENT = 4  # both ALIGNMENTS keep four teacher layers
ORDERS = ("last", "first")
EMBEDDING_TENSOR = {"gpt2": "transformer.wte.weight"}
HEAD_TENSOR = "lm_head.weight"


def _block_choices() -> dict[str, tuple[tuple[str, ...], frozenset[int]]]:
    """Test id -> (build options, the blocks they patch)."""
    everything = frozenset(range(N_STUDENT))
    choices = {
        f"keep{N_STUDENT}": (("--keep", str(N_STUDENT)), frozenset()),
        "keep0": (("--keep", "0"), everything),
    }
    for order, keep in itertools.product(ORDERS, range(1, N_STUDENT)):
        patched = frozenset(kept_blocks_patched(keep, N_STUDENT, order))
        choices[f"keep{keep}-{order}"] = (("--keep", str(keep), "--order", order), patched)
    for subset in ((0,), (N_STUDENT - 1,), (0, N_STUDENT - 1), (1, 2)):
        text = ",".join(map(str, subset))
        choices[f"blocks{text}"] = (("--blocks", text), frozenset(subset))
    return choices


BLOCK_CHOICES = _block_choices()


def _all_subsets(n_student: int) -> list[set[int]]:
    return [
        set(subset)
        for size in range(n_student + 1)
        for subset in itertools.combinations(range(n_student), size)
    ]


def _explain(got: torch.Tensor, expected: torch.Tensor, pair, input_ids) -> str:
    """Which splice of whole blocks, if any, the built model is instead."""
    matches = [
        sorted(patched)
        for patched in _all_subsets(len(pair.copied))
        if torch.equal(got, logits(splice(pair.teacher, pair.student, pair.copied, patched), input_ids))
    ]
    found = f"it equals the splice of blocks {matches}" if matches else "it equals no splice of whole blocks"
    if got.shape != expected.shape:
        return f"logits shape {tuple(got.shape)} != expected {tuple(expected.shape)}; {found}"
    return f"max |diff| {(got - expected).abs().max().item():.3g}; {found}"


def _assert_same_logits(built, expected_model, pair, input_ids) -> None:
    got, expected = logits(built, input_ids), logits(expected_model, input_ids)
    assert torch.equal(got, expected), _explain(got, expected, pair, input_ids)


@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_reference_splice_is_exact_at_both_ends_and_tells_all_splices_apart(
    checkpoints, input_ids, tmp_path, arch, alignment
):
    """The oracle itself: no patch is the student, all patched is the teacher, and
    every one of the 2^S splices has different logits, so exact equality has power."""
    pair = checkpoints(arch, ALIGNMENTS[alignment])
    everything = set(range(len(pair.copied)))
    no_patch = splice(pair.teacher, pair.student, pair.copied, set())
    all_patched = splice(pair.teacher, pair.student, pair.copied, everything)
    assert torch.equal(logits(no_patch, input_ids), logits(pair.student, input_ids))
    assert torch.equal(logits(all_patched, input_ids), logits(pair.teacher, input_ids))

    outputs = [
        logits(splice(pair.teacher, pair.student, pair.copied, patched), input_ids)
        for patched in _all_subsets(len(pair.copied))
    ]
    for a, b in itertools.combinations(range(len(outputs)), 2):
        assert not torch.equal(outputs[a], outputs[b]), f"splices {a} and {b} are indistinguishable"

    # A splice survives save_pretrained and reloading bit for bit, so the
    # comparison with a built directory can be exact.
    mixed = splice(pair.teacher, pair.student, pair.copied, {0, 2})
    mixed.save_pretrained(tmp_path / "mixed")
    assert torch.equal(logits(load_causal_lm(tmp_path / "mixed"), input_ids), logits(mixed, input_ids))


@pytest.mark.parametrize("choice", BLOCK_CHOICES)
@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_build_logits_equal_in_memory_splice(
    checkpoints, build, input_ids, tmp_path, arch, alignment, choice
):
    pair = checkpoints(arch, ALIGNMENTS[alignment])
    options, patched = BLOCK_CHOICES[choice]
    built = load_causal_lm(build(pair, tmp_path / "out", *options))
    _assert_same_logits(built, splice(pair.teacher, pair.student, pair.copied, patched), pair, input_ids)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_build_layers_gives_that_many_layers_patched_from_the_chosen_end(
    checkpoints, build, input_ids, tmp_path, arch, alignment, order
):
    pair = checkpoints(arch, ALIGNMENTS[alignment])
    n_layers = N_TEACHER - 1
    built = load_causal_lm(build(pair, tmp_path / "out", "--layers", str(n_layers), "--order", order))
    assert built.config.num_hidden_layers == n_layers

    lengths = [len(block) for block in blocks(pair.copied, N_TEACHER)]
    candidates = [
        patched
        for patched in patch_order_prefixes(len(pair.copied), order)
        if len(pair.copied) + sum(lengths[i] - 1 for i in patched) == n_layers
    ]
    got = logits(built, input_ids)
    expected = [
        logits(splice(pair.teacher, pair.student, pair.copied, patched), input_ids)
        for patched in candidates
    ]
    assert any(torch.equal(got, e) for e in expected), (
        f"expected one of the splices {[sorted(c) for c in candidates]}; "
        + _explain(got, expected[0], pair, input_ids)
    )


@pytest.mark.parametrize("k", range(4))  # both ALIGNMENTS hold two multi-layer blocks
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_build_patch_k_equals_reference_formula(
    checkpoints, build, input_ids, tmp_path, arch, alignment, order, k
):
    pair = checkpoints(arch, ALIGNMENTS[alignment])
    built = load_causal_lm(build(pair, tmp_path / "out", "--patch", str(k), "--order", order))
    expected = reference_patch(pair.teacher, pair.student, pair.copied, k, order)
    _assert_same_logits(built, expected, pair, input_ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_every_student_block_writes_the_student_tensors_byte_for_byte(
    checkpoints, build, tmp_path, arch
):
    pair = checkpoints(arch, ALIGNMENTS["1-2-2"])
    out = build(pair, tmp_path / "out", "--keep", str(len(pair.copied)))
    assert tensors_as_bytes(out) == tensors_as_bytes(pair.student_dir)


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_no_student_block_writes_the_teacher_tensors_byte_for_byte(
    checkpoints, build, tmp_path, arch
):
    pair = checkpoints(arch, ALIGNMENTS["1-2-2"])
    out = build(pair, tmp_path / "out", "--keep", "0")
    assert tensors_as_bytes(out) == tensors_as_bytes(pair.teacher_dir)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("arch", TIED_ARCHS)
def test_head_and_embeddings_from_different_models_are_written_untied(
    checkpoints, build, tmp_path, arch, order
):
    """Order last takes the head from the teacher and the embeddings from the
    student; order first the other way round. The head must then be its own
    tensor, a copy of its source's tied embedding matrix."""
    pair = checkpoints(arch, ALIGNMENTS["1-2-2"])
    out = build(pair, tmp_path / "out", "--keep", "2", "--order", order)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False

    head_source = pair.teacher_dir if order == "last" else pair.student_dir
    embedding = EMBEDDING_TENSOR.get(arch, "model.embed_tokens.weight")
    written = tensors_as_bytes(out)
    assert HEAD_TENSOR in written
    assert written[HEAD_TENSOR] == tensors_as_bytes(head_source)[embedding]


@dataclasses.dataclass(frozen=True)
class AlignmentCase:
    student_copied: tuple[int, ...]  # what the student was made from
    student_config: bool  # whether its directory has student_config.json
    options: tuple[str, ...]
    copied: tuple[int, ...]  # the alignment the options must give


ALIGNMENT_CASES = {
    # A layout no first/every/last rule gives: blocks [0,3), [3,4), [4,6).
    "copied-0_3_4": AlignmentCase((0, 3, 4), False, ("--copied-teacher-layers", "0,3,4"), (0, 3, 4)),
    "rule-1_2_2": AlignmentCase(
        ALIGNMENTS["1-2-2"], False, ("--first", "1", "--every", "2", "--last", "2"), ALIGNMENTS["1-2-2"]
    ),
    "rule-2_2_1": AlignmentCase(
        ALIGNMENTS["2-2-1"], False, ("--first", "2", "--every", "2", "--last", "1"), ALIGNMENTS["2-2-1"]
    ),
    # With --override-alignment the option wins over the student's own student_config.json (which says 1-2-2).
    "option-over-file": AlignmentCase(
        ALIGNMENTS["1-2-2"], True, ("--copied-teacher-layers", "0,1,3,5", "--override-alignment"), ALIGNMENTS["2-2-1"]
    ),
}
ALIGNMENT_BLOCK_CHOICES = {
    "keep1-last": (("--keep", "1", "--order", "last"), lambda n_student: kept_blocks_patched(1, n_student, "last")),
    "blocks0,2": (("--blocks", "0,2"), lambda n_student: {0, 2}),
}


@pytest.mark.parametrize("choice", ALIGNMENT_BLOCK_CHOICES)
@pytest.mark.parametrize("case", ALIGNMENT_CASES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_alignment_options_set_the_blocks(checkpoints, build, input_ids, tmp_path, arch, case, choice):
    case = ALIGNMENT_CASES[case]
    options, patched = ALIGNMENT_BLOCK_CHOICES[choice]
    pair = checkpoints(arch, case.student_copied, student_config=case.student_config)
    pair = dataclasses.replace(pair, copied=case.copied)
    built = load_causal_lm(build(pair, tmp_path / "out", *case.options, *options))
    expected = splice(pair.teacher, pair.student, case.copied, patched(len(case.copied)))
    _assert_same_logits(built, expected, pair, input_ids)


def _without_prefix(source: Path, prefix: str, directory: Path) -> Path:
    """A copy of a checkpoint whose tensor names lack `prefix`, as on the Hub's original gpt2."""
    shutil.copytree(source, directory)
    for path in directory.glob("*.safetensors"):
        tensors = load_file(path)
        renamed = {name.removeprefix(prefix): tensor for name, tensor in tensors.items()}
        save_file(renamed, path, metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("renamed", ["teacher", "both"])
def test_gpt2_checkpoints_named_without_the_transformer_prefix(
    checkpoints, build, input_ids, tmp_path, renamed, order
):
    """Hub gpt2 files name tensors h.0..., wte, ln_f; a student saved by
    transformers names them transformer.h.0.... Either mix must build."""
    pair = checkpoints("gpt2", ALIGNMENTS["1-2-2"])
    teacher_dir = _without_prefix(pair.teacher_dir, "transformer.", tmp_path / "teacher")
    student_dir = pair.student_dir
    if renamed == "both":
        student_dir = _without_prefix(pair.student_dir, "transformer.", tmp_path / "student")
    assert torch.equal(logits(load_causal_lm(teacher_dir), input_ids), logits(pair.teacher, input_ids))

    renamed_pair = dataclasses.replace(pair, teacher_dir=teacher_dir, student_dir=student_dir)
    built = load_causal_lm(build(renamed_pair, tmp_path / "out", "--keep", "2", "--order", order))
    patched = kept_blocks_patched(2, len(pair.copied), order)
    _assert_same_logits(built, splice(pair.teacher, pair.student, pair.copied, patched), pair, input_ids)
