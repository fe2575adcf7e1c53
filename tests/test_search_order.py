"""--order search and the cache that makes candidates cheap (issue 23).

The references (search_support.py) build every splice as a whole nn.Module
splice and run it from its first layer; layer-forwards are counted by
wrapping transformers' decoder layer, not by layersplice's own counter.
"""

from __future__ import annotations

import pytest
import torch
from eval_support import eval_pair, one_torch_thread  # noqa: F401 - fixtures
from search_support import CPU, Reference, counting_layers, make_pair
from splice_reference import load_causal_lm, splice

from layersplice.evaluation.candidates import SpliceRunner
from layersplice.evaluation.in_memory import LoadedPair
from layersplice.evaluation.kl_order import KLScorer, choose_kl_order
from layersplice.evaluation.perplexity import load_text, load_tokenizer
from layersplice.evaluation.search_order import search_order, subsets_count, subsets_of_size
from layersplice.planning.blocks import size_of
from layersplice.planning.job import open_job

ALL_SUBSETS_OF_FOUR = [frozenset(b for b in range(4) if bits >> b & 1) for bits in range(16)]


def loaded_pair(teacher, student) -> LoadedPair:
    return LoadedPair(open_job(str(teacher), str(student), []), CPU, torch.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "gpt2"])
@pytest.mark.parametrize("cache_bytes", [1 << 30, 20_000], ids=["all-cached", "evicting"])
def test_a_splice_run_from_a_cached_state_gives_the_logits_of_a_whole_nn_module_splice(eval_pair, arch, cache_bytes):
    pair = eval_pair(arch)
    loaded = loaded_pair(pair.teacher, pair.student)
    text = load_text(pair.text, load_tokenizer(pair.teacher), seq_len=16, max_tokens=96)
    runner = SpliceRunner(loaded, text, batch_size=2, cache_bytes=cache_bytes)
    got: dict[tuple[frozenset[int], int], torch.Tensor] = {}
    runner.run(ALL_SUBSETS_OF_FOUR, lambda s, i, logits, mask: got.__setitem__((s, i), logits.clone()))
    teacher, student = load_causal_lm(pair.teacher), load_causal_lm(pair.student)
    batches = list(zip(text.windows.ids.split(2), text.windows.mask.split(2)))
    for patched in ALL_SUBSETS_OF_FOUR:
        model = splice(teacher, student, pair.copied, set(patched))
        for i, (ids, mask) in enumerate(batches):
            with torch.no_grad():
                expected = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
            torch.testing.assert_close(got[patched, i], expected, atol=2e-4, rtol=1e-4)
    full = sum(size_of(loaded.job.pair.alignment, s) for s in ALL_SUBSETS_OF_FOUR)
    assert runner.full_passes == full
    assert runner.spent < full if cache_bytes > 20_000 else runner.spent <= full


@pytest.fixture(scope="module")
def ten_layer_pair(tmp_path_factory):
    """4 two-layer blocks and 2 one-layer blocks: 64 sets of blocks, sizes 7, 8 and 9 in between."""
    pair = make_pair(tmp_path_factory.mktemp("ten"), 10, (0, 2, 4, 6, 8, 9), seed=3)
    text = load_text(eval_support_text(tmp_path_factory), load_tokenizer(pair.teacher), seq_len=32, max_tokens=256)
    return pair, text


def eval_support_text(tmp_path_factory):
    from eval_support import TEXT_MODULES

    from layersplice.evaluation.stdlib_text import write_documents

    return write_documents(tmp_path_factory.mktemp("text") / "calibration.jsonl", TEXT_MODULES)


def test_exact_search_chooses_what_an_independent_brute_force_over_every_subset_chooses(ten_layer_pair):
    pair, text = ten_layer_pair
    found = search_order(loaded_pair(pair.teacher, pair.student), text, batch_size=4)
    reference = Reference(pair, text, batch_size=4)
    alignment = open_job(str(pair.teacher), str(pair.student), []).pair.alignment
    assert [s.layers for s in found.sizes] == [7, 8, 9]
    for size in found.sizes:
        every = [frozenset(s) for s in _all_sets(6) if size_of(alignment, frozenset(s)) == size.layers]
        kls = reference.kl(every)
        ranked = sorted(zip(kls, every), key=lambda item: item[0])
        assert ranked[1][0] - ranked[0][0] > 1e-4, "a near tie would make this check depend on rounding"
        assert size.method == "exact" and size.scored == size.subsets == len(every)
        assert frozenset(size.patched) == ranked[0][1], size
        assert size.kl == pytest.approx(ranked[0][0], rel=1e-4)
        assert size.greedy_kl is None or size.kl <= size.greedy_kl


def _all_sets(n: int) -> list[tuple[int, ...]]:
    return [tuple(b for b in range(n) if bits >> b & 1) for bits in range(1 << n)]


def test_subsets_of_a_size_are_counted_and_listed_alike_for_uneven_blocks():
    from layersplice.planning.alignment import Alignment

    alignment = Alignment(copied=(0, 3, 4, 6, 7), n_teacher=10)  # block lengths 3, 1, 2, 1, 3
    for layers in range(5, 11):
        listed = list(subsets_of_size(alignment, layers))
        brute = [frozenset(s) for s in _all_sets(5) if size_of(alignment, frozenset(s)) == layers]
        assert sorted(map(sorted, listed)) == sorted(map(sorted, brute))
        assert subsets_count(alignment, layers) == len(brute)


@pytest.fixture(scope="module")
def nineteen_block_pair(tmp_path_factory):
    """A 36-layer teacher and its 1/2/2 student: 17 two-layer blocks and 2 one-layer blocks, as Qwen3-4B's."""
    copied = tuple(range(0, 34, 2)) + (34, 35)
    pair = make_pair(tmp_path_factory.mktemp("nineteen"), 36, copied, seed=5, hidden=16)
    text = load_text(eval_support_text(tmp_path_factory), load_tokenizer(pair.teacher), seq_len=32, max_tokens=128)
    return pair, text


@pytest.fixture(scope="module")
def fixture_pair_and_demo_text(tmp_path_factory):
    from search_support import DeepPair

    from layersplice.cli.eval_commands import CALIBRATION_TOKENS, RECIPE, SEQ_LEN
    from layersplice.evaluation.stdlib_text import CALIBRATION_MODULES, write_documents

    fixtures = RECIPE.parent.parent / "fixtures"
    pair = DeepPair(fixtures / "tiny-teacher", fixtures / "tiny-student", (0, 2, 4, 6, 8, 10, 12, 14, 15))
    calibration = write_documents(tmp_path_factory.mktemp("demo-text") / "calibration.jsonl", CALIBRATION_MODULES)
    return pair, load_text(calibration, load_tokenizer(pair.teacher), SEQ_LEN, CALIBRATION_TOKENS)


@pytest.mark.parametrize("which", ["fixture_pair_and_demo_text", "nineteen_block_pair"])
def test_greedy_kl_with_the_cache_gives_the_base_commits_order_in_at_most_0_6x_its_layer_forwards(request, which):
    pair, text = request.getfixturevalue(which)
    with counting_layers(text) as before:
        expected = Reference(pair, text, batch_size=4).kl_order()
    with counting_layers(text) as now:
        chosen = choose_kl_order(loaded_pair(pair.teacher, pair.student), text, batch_size=4)
    print(f"{which}: {now.layer_forwards:.1f} layer-forwards, against {before.layer_forwards:.1f} "
          f"({now.layer_forwards / before.layer_forwards:.2f}x)")
    assert list(chosen.greedy) == expected
    assert now.layer_forwards <= 0.6 * before.layer_forwards
    assert chosen.layer_forwards["spent"] == pytest.approx(now.layer_forwards)
    assert chosen.layer_forwards["full_passes"] == pytest.approx(before.layer_forwards)


def test_search_on_a_19_block_student_costs_no_more_than_the_uncached_greedy_order_and_beats_it(nineteen_block_pair):
    pair, text = nineteen_block_pair
    with counting_layers(text) as before:
        Reference(pair, text, batch_size=4).kl_order()
    with counting_layers(text) as now:
        found = search_order(loaded_pair(pair.teacher, pair.student), text, batch_size=4)
    print(f"search: {now.layer_forwards:.1f} layer-forwards, uncached greedy {before.layer_forwards:.1f}")
    assert now.layer_forwards <= before.layer_forwards
    assert found.layer_forwards["greedy_without_cache"] == pytest.approx(before.layer_forwards)
    assert [s.layers for s in found.sizes] == list(range(20, 36))
    assert {s.method for s in found.sizes[1:-1]} == {"beam"}
    assert all(s.kl <= s.greedy_kl for s in found.sizes)
    assert sum(s.kl < s.greedy_kl for s in found.sizes) >= 3


def test_the_kl_scorer_scores_each_set_once_and_the_teacher_once(ten_layer_pair):
    pair, text = ten_layer_pair
    scorer = KLScorer(loaded_pair(pair.teacher, pair.student), text, batch_size=4)
    with counting_layers(text) as count:
        first = scorer.scores([frozenset({1}), frozenset({1, 2})])
        again = scorer.scores([frozenset({1, 2}), frozenset({1})])
    assert again == first[::-1]
    # The teacher (10 layers) once; {1} from its first layer (7 layers); {1, 2} from block 2 (5 of its 8).
    assert count.layer_forwards == pytest.approx(10 + 7 + 5)
