"""The reference's first/every/last rule and block bookkeeping (METHOD.md §2-4)."""

import pytest

from layersplice.errors import AlignmentError, LayerspliceError
from layersplice.planning.alignment import Alignment, copied_from_rule
from layersplice.planning.blocks import by_keep, by_layers, by_patch, size_of


@pytest.mark.parametrize(
    ("n_teacher", "rule", "expected"),
    [
        (36, (1, 2, 2), tuple(range(0, 34, 2)) + (34, 35)),  # Qwen3-4B -> 19 layers
        (32, (1, 2, 2), tuple(range(0, 30, 2)) + (30, 31)),  # Pythia-2.8B -> 17 layers
        (28, (2, 2, 1), (0,) + tuple(range(1, 27, 2)) + (27,)),  # Llama-3.2-3B -> 15 layers
        (6, (1, 2, 2), (0, 2, 4, 5)),
    ],
)
def test_rule_keeps_the_reference_layers(n_teacher, rule, expected):
    assert copied_from_rule(n_teacher, *rule) == expected


def test_layer_counts_of_published_students():
    assert len(copied_from_rule(36, 1, 2, 2)) == 19
    assert len(copied_from_rule(32, 1, 2, 2)) == 17
    assert len(copied_from_rule(28, 2, 2, 1)) == 15


def test_cosine_pairs_align_each_student_layer_with_the_end_of_its_block():
    alignment = Alignment(copied_from_rule(36, 1, 2, 2), 36)
    pairs = dict(alignment.hidden_state_pairs())
    assert pairs == {0: 0, **{i: 2 * i for i in range(1, 18)}, 18: 35}


def test_student_config_is_the_reference_format():
    alignment = Alignment((0, 2, 4, 5), 6)
    assert alignment.student_config() == {"pruned_teacher_layers": [1, 3], "copied_teacher_layers": [0, 2, 4, 5]}


@pytest.mark.parametrize("copied", [(1, 2), (0, 2, 2), (0, 9)])
def test_bad_alignments_are_rejected(copied):
    with pytest.raises(AlignmentError):
        Alignment(copied, 6)


def test_keep_counts_student_blocks_from_the_patched_end():
    alignment = Alignment((0, 2, 4, 5), 6)
    assert by_keep(alignment, 4, "last") == frozenset()
    assert by_keep(alignment, 1, "last") == {1, 2, 3}
    assert by_keep(alignment, 1, "first") == {0, 1, 2}
    assert by_keep(alignment, 0, "first") == {0, 1, 2, 3}
    with pytest.raises(LayerspliceError):
        by_keep(alignment, 5, "last")


def test_patch_k_counts_multi_layer_blocks_like_the_reference():
    # Llama layout: one-layer blocks at both ends.
    alignment = Alignment(copied_from_rule(28, 2, 2, 1), 28)
    multi = [b for b in range(15) if alignment.block_length(b) > 1]
    assert len(multi) == 13
    # k = 0 already swaps the trailing one-layer block (order last).
    assert by_patch(alignment, 0, "last") == {14}
    assert by_patch(alignment, 1, "last") == {13, 14}
    assert by_patch(alignment, 0, "first") == {0}
    assert by_patch(alignment, 13, "last") == frozenset(range(15))
    assert size_of(alignment, by_patch(alignment, 5, "first")) == 15 + 5


def test_layers_picks_the_pure_ends_and_reference_sizes_between():
    alignment = Alignment(copied_from_rule(28, 2, 2, 1), 28)
    assert by_layers(alignment, 15, "last") == frozenset()
    assert by_layers(alignment, 28, "last") == frozenset(range(15))
    assert by_layers(alignment, 20, "first") == by_patch(alignment, 5, "first")
    with pytest.raises(LayerspliceError, match="reachable sizes"):
        by_layers(alignment, 40, "last")
