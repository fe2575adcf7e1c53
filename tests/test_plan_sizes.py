"""`plan` sums per-layer totals (SizeTable) instead of listing every tensor of
every size; its numbers must be exactly those of the full plans."""

from __future__ import annotations

from itertools import chain, combinations

import pytest
from conftest import ALIGNMENTS
from hypothesis import given
from hypothesis import strategies as st
from test_properties import _fake_llama, alignments

from layersplice.architectures.layout import layout_of
from layersplice.planning.alignment import AlignmentSpec
from layersplice.planning.job import open_job
from layersplice.planning.plan import STUDENT, TEACHER, SizeTable, check_pair, make_plan


def _agree(pair, patched: frozenset[int], cast: str | None, table: SizeTable) -> None:
    plan, size = make_plan(pair, patched, cast), table.size(patched)
    assert (size.n_layers, size.params, size.nbytes) == (plan.n_layers, plan.params, plan.nbytes)
    assert (size.embeddings_from, size.head_from, size.teacher_blocks) == (plan.embeddings_from, plan.head_from, plan.teacher_blocks)


@given(alignments(), st.data(), st.sampled_from([None, "BF16", "F64"]))
def test_size_table_equals_the_full_plan_for_any_subset(alignment, data, cast):
    teacher, student = _fake_llama(alignment.n_teacher, TEACHER), _fake_llama(alignment.n_student, STUDENT)
    pair = check_pair(layout_of(teacher), layout_of(student), alignment, cast)
    table = SizeTable(pair, cast)
    for _ in range(3):
        _agree(pair, frozenset(data.draw(st.sets(st.integers(0, alignment.n_student - 1)))), cast, table)


def _every_subset(n: int):
    return map(frozenset, chain.from_iterable(combinations(range(n), k) for k in range(n + 1)))


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gpt2", "gemma3", "gpt_neox"])
def test_size_table_equals_the_full_plan_with_tied_and_untied_heads(checkpoints, arch):
    pair = checkpoints(arch, ALIGNMENTS["1-2-2"])
    job = open_job(str(pair.teacher_dir), str(pair.student_dir), [], "BF16")
    table = SizeTable(job.pair, "BF16")
    for patched in _every_subset(job.pair.alignment.n_student):
        _agree(job.pair, patched, "BF16", table)


@pytest.mark.parametrize(("teacher", "student"), [("llama", "phi3"), ("phi3", "llama")])
def test_size_table_equals_the_full_plan_across_families(family_pair, teacher, student):
    pair = family_pair(teacher, (0, 1, 3, 5), student_kind=student, student_config_file=False)
    spec = AlignmentSpec(copied=(0, 1, 3, 5), origin="test")
    job = open_job(str(pair.teacher_dir), str(pair.student_dir), [spec])
    table = SizeTable(job.pair)
    for patched in _every_subset(4):
        _agree(job.pair, patched, None, table)
