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


@pytest.fixture(scope="module")
def base_kl_order(request):
    """(pair, text, the base commit's greedy order, the layer-forwards it ran) of a pair fixture, run once."""
    done = {}

    def get(which: str):
        if which not in done:
            pair, text = request.getfixturevalue(which)
            with counting_layers(text) as before:
                order = Reference(pair, text, batch_size=4).kl_order()
            done[which] = pair, text, order, before.layer_forwards
        return done[which]

    return get


@pytest.mark.parametrize("which", ["fixture_pair_and_demo_text", "nineteen_block_pair"])
def test_greedy_kl_with_the_cache_gives_the_base_commits_order_in_at_most_0_6x_its_layer_forwards(base_kl_order, which):
    pair, text, expected, before = base_kl_order(which)
    with counting_layers(text) as now:
        chosen = choose_kl_order(loaded_pair(pair.teacher, pair.student), text, batch_size=4)
    print(f"{which}: {now.layer_forwards:.1f} layer-forwards, against {before:.1f} ({now.layer_forwards / before:.2f}x)")
    assert list(chosen.greedy) == expected
    assert now.layer_forwards <= 0.6 * before
    assert chosen.layer_forwards["spent"] == pytest.approx(now.layer_forwards)
    assert chosen.layer_forwards["full_passes"] == pytest.approx(before)


def test_search_on_a_19_block_student_costs_no_more_than_the_uncached_greedy_order_and_beats_it(base_kl_order):
    pair, text, _, before = base_kl_order("nineteen_block_pair")
    with counting_layers(text) as now:
        found = search_order(loaded_pair(pair.teacher, pair.student), text, batch_size=4)
    print(f"search: {now.layer_forwards:.1f} layer-forwards, uncached greedy {before:.1f}")
    assert now.layer_forwards <= before
    assert found.layer_forwards["greedy_without_cache"] == pytest.approx(before)
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


def test_the_kl_scorer_reports_sets_scored_and_work_spent_after_each_models_batch(ten_layer_pair):
    pair, text = ten_layer_pair
    scorer = KLScorer(loaded_pair(pair.teacher, pair.student), text, batch_size=4)
    calls = []
    scorer.on_progress = lambda *reported: calls.append(reported)
    with counting_layers(text) as count:
        scorer.scores([frozenset({1}), frozenset({1, 2})])
    batches = scorer.runner.batches
    assert batches > 1
    assert len(calls) == 2 * batches  # each candidate's each batch; the teacher's targets are not reported
    scored, under_way, shares, works = (list(column) for column in zip(*calls))
    # Candidates finish in the last batch, one after the other; the teacher is not a scored set.
    assert scored == [0] * (2 * batches - 2) + [1, 2] and len(scorer.known) == 3
    assert under_way == [2] * (2 * batches - 2) + [1, 0]
    assert shares == pytest.approx([(k + 1) / (2 * batches) for k in range(2 * batches)])
    assert works == sorted(works) and works[0] > 0
    assert works[-1] == pytest.approx(count.layer_forwards) == 10 + 7 + 5  # counted independently, as above


# --- On the command line -----------------------------------------------------


def cli(*args: str, cwd=None):
    from click.testing import CliRunner

    from layersplice.cli.main import cli as group

    return CliRunner().invoke(group, list(map(str, args)))


@pytest.fixture(scope="module")
def searched_family(ten_layer_pair, tmp_path_factory):
    """`build --all --order search` of the 10-layer pair, and the text it was calibrated on."""
    pair, _ = ten_layer_pair
    calib = eval_support_text(tmp_path_factory)
    out = tmp_path_factory.mktemp("family") / "fam"
    result = cli("build", *pair.args(), "--order", "search", "--calib", calib, "--all", "--out", out, "--name", "ten")
    assert result.exit_code == 0, result.output
    return pair, calib, out, result


def test_build_all_order_search_records_each_sizes_choice_in_its_record_the_manifest_and_the_card(searched_family):
    import json

    _, _, out, result = searched_family
    assert "--order search: 8 layers patch blocks" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    middle = [entry for entry in manifest["sizes"] if entry["layers"] not in (6, 10)]
    assert [entry["layers"] for entry in middle] == [7, 8, 9]
    for entry in middle:
        provenance = json.loads((out / entry["directory"] / "layersplice.json").read_text())
        search = provenance["choice"]["search"]
        size = next(s for s in search["sizes"] if s["layers"] == entry["layers"])
        assert provenance["choice"]["order"] == "search"
        assert provenance["patched_blocks"] == size["patched_blocks"] == entry["patched_blocks"]
        assert entry["search"] == {"kl": size["kl"], "greedy_kl": size["greedy_kl"], "method": "exact"}
        assert size["kl"] <= size["greedy_kl"]
        card = (out / entry["directory"] / "README.md").read_text()
        assert f"This size patches student blocks {', '.join(map(str, size['patched_blocks']))}, chosen by " \
               f"`--order search`: of all {size['subsets']} sets of blocks that make models of " \
               f"{entry['layers']} layers, these bring the model closest to the teacher" in card
    assert cli("verify", out).exit_code == 0


def test_order_file_reuses_a_search_for_plan_build_and_eval(searched_family, tmp_path):
    import json

    pair, calib, out, _ = searched_family
    record = next(out.glob("ten-8L")) / "layersplice.json"
    chosen = {s["layers"]: s["patched_blocks"] for s in json.loads(record.read_text())["choice"]["search"]["sizes"]}
    planned = cli("plan", *pair.args(), "--order-file", record, "--json")
    assert planned.exit_code == 0, planned.output
    rows = {row["layers"]: row["teacher_blocks"] for row in json.loads(planned.stdout)["sizes"]}
    assert rows == {6: [], **chosen, 10: list(range(6))}
    rebuilt = tmp_path / "eight"
    built = cli("build", *pair.args(), "--order-file", record, "--layers", 8, "--out", rebuilt)
    assert built.exit_code == 0, built.output
    assert (rebuilt / "model.safetensors").read_bytes() == (out / "ten-8L" / "model.safetensors").read_bytes()
    evaluated = cli("eval", *pair.args(), "--order-file", record, "--data", calib, "--max-tokens", 256,
                    "--out", tmp_path / "eval", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    sizes = json.loads(evaluated.stdout)["perplexity"]["sizes"]
    assert {s["layers"]: s["patched_blocks"] for s in sizes} == rows


def test_eval_models_alone_measures_a_searched_family_at_the_sets_its_sizes_were_built_with(searched_family, tmp_path):
    import json

    _, calib, out, _ = searched_family
    evaluated = cli("eval", "--models", out, "--data", calib, "--max-tokens", 256, "--out", tmp_path / "eval", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    built = {entry["layers"]: entry["patched_blocks"] for entry in json.loads((out / "manifest.json").read_text())["sizes"]}
    sizes = json.loads(evaluated.stdout)["perplexity"]["sizes"]
    assert {s["layers"]: s["patched_blocks"] for s in sizes} == built


def test_keep_patch_and_params_pick_sizes_of_a_search_or_say_which_exist(searched_family, tmp_path):
    import json

    pair, _, out, _ = searched_family
    record = out / "ten-8L" / "layersplice.json"
    search = json.loads(record.read_text())["choice"]["search"]["sizes"]
    by_keep = {}
    for size in search:
        by_keep.setdefault(6 - len(size["patched_blocks"]), []).append(size)
    keep, sizes = next((k, s) for k, s in sorted(by_keep.items()) if len(s) == 1)
    kept = cli("build", *pair.args(), "--order-file", record, "--keep", keep, "--out", tmp_path / "k")
    assert kept.exit_code == 0, kept.output
    assert json.loads((tmp_path / "k" / "layersplice.json").read_text())["patched_blocks"] == sizes[0]["patched_blocks"]
    missing = next(k for k in range(1, 6) if k not in by_keep)
    refused = cli("build", *pair.args(), "--order-file", record, "--keep", missing, "--out", tmp_path / "m")
    assert refused.exit_code == 2 and f"--keep {missing} is not a size of the search" in refused.output
    assert not (tmp_path / "m").exists()
    patched = cli("build", *pair.args(), "--order-file", record, "--patch", 2, "--out", tmp_path / "p")
    assert patched.exit_code == 0, patched.output
    assert json.loads((tmp_path / "p" / "layersplice.json").read_text())["patched_blocks"] == \
        next(s["patched_blocks"] for s in search if s["layers"] == 8)
    target = cli("plan", *pair.args(), "--order-file", record, "--params", "1", "--json")
    assert target.exit_code == 0 and json.loads(target.stdout)["chosen"]["layers"] == 6


def test_recipes_accept_order_kl_and_search_with_their_calibration_text(searched_family, tmp_path):
    import json

    pair, calib, _, _ = searched_family
    for order in ("kl", "search"):
        recipe = tmp_path / f"{order}.yaml"
        recipe.write_text(f"name: r\nteacher: {pair.teacher}\nstudent: {pair.student}\norder: {order}\n"
                          f"calib: {calib}\n")
        result = cli("plan", "--recipe", recipe, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["order"] == order
    recipe.write_text(f"name: r\nteacher: {pair.teacher}\nstudent: {pair.student}\norder: search\n")
    result = cli("plan", "--recipe", recipe)
    assert result.exit_code == 2 and "--order search measures KL on calibration text: add --calib" in result.output
    recipe.write_text(f"name: r\nteacher: {pair.teacher}\nstudent: {pair.student}\norder: kl\ncalib: gone.jsonl\n")
    result = cli("plan", "--recipe", recipe)
    assert result.exit_code == 2 and f"{recipe}: calib {tmp_path / 'gone.jsonl'} does not exist" in result.output


@pytest.mark.parametrize("content, message", [
    ('{"search": {"sizes": [{"layers": 8}]}}', "no list of sizes with 'layers' and 'patched_blocks'"),
    ('{"choice": {"search": {"sizes": [{"layers": 9, "patched_blocks": [0]}]}}}', "make a model of 7 layers"),
    ('{"search": {"sizes": [{"layers": 7, "patched_blocks": [7]}]}}', "names block 7, but the student has blocks 0..5"),
])
def test_an_order_file_with_a_broken_search_is_one_line_naming_the_file(ten_layer_pair, tmp_path, content, message):
    pair, _ = ten_layer_pair
    path = tmp_path / "layersplice.json"
    path.write_text(content)
    result = cli("plan", *pair.args(), "--order-file", path)
    assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output
