"""Property-based tests of the header parser and the planner.

The default profile keeps them to seconds; `--hypothesis-profile=fuzz` is the
long run recorded in tests/README.md.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from layersplice.architectures.layout import layout_of
from layersplice.checkpoint.safetensors_format import DTYPE_SIZES, TensorInfo, parse_header
from layersplice.checkpoint.source import Checkpoint
from layersplice.errors import CheckpointError, LayerspliceError
from layersplice.planning.alignment import Alignment
from layersplice.planning.blocks import size_of
from layersplice.planning.plan import STUDENT, TEACHER, check_pair, make_plan

FAKE = Path("/nonexistent/model.safetensors")

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)


@st.composite
def valid_headers(draw) -> tuple[dict, int]:
    names = draw(st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=6, unique=True))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    return header, offset


def mutate(value, draw):
    """Replace one leaf or key of a JSON-like value with arbitrary JSON."""
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        choice = draw(st.integers(0, 2))
        copy = dict(value)
        if choice == 0:
            copy[key] = mutate(value[key], draw)
        elif choice == 1:
            del copy[key]
        else:
            copy[draw(st.text(max_size=6))] = draw(json_values)
        return copy
    if isinstance(value, list) and value:
        index = draw(st.integers(0, len(value) - 1))
        return value[:index] + [mutate(value[index], draw)] + value[index + 1 :]
    return draw(json_values)


def _check_parsed(raw: bytes, file_size: int) -> None:
    try:
        parsed = parse_header(FAKE, raw, file_size)
    except CheckpointError:
        return
    data_start, spans = 8 + len(raw), []
    for info in parsed.tensors.values():
        assert data_start <= info.start <= info.end <= file_size
        assert info.nbytes == info.numel * DTYPE_SIZES[info.dtype]
        spans.append((info.start, info.end))
    spans = sorted(s for s in spans if s[0] < s[1])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


@given(st.binary(max_size=200), st.integers(0, 10**6))
def test_parser_only_raises_checkpoint_errors_on_random_bytes(raw, extra):
    _check_parsed(raw, 8 + len(raw) + extra)


@given(valid_headers(), st.integers(-3, 3), st.data())
def test_parser_accepts_valid_and_rejects_mutated_headers_cleanly(header_and_size, slack, data):
    header, data_size = header_and_size
    raw = json.dumps(header).encode()
    _check_parsed(raw, 8 + len(raw) + max(0, data_size + slack))
    mutated = json.dumps(mutate(header, data.draw)).encode()
    _check_parsed(mutated, 8 + len(mutated) + data_size)


def test_parser_accepts_a_valid_header_exactly():
    raw = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    parsed = parse_header(FAKE, raw, 8 + len(raw) + 8)
    assert parsed.tensors["a"] == TensorInfo("a", FAKE, 8 + len(raw), 16 + len(raw), "F32", (2,))
    assert struct.calcsize("<Q") == 8


def _fake_llama(n_layers: int, tag: str) -> Checkpoint:
    tensors, offset = {}, 0

    def add(name: str, shape: tuple[int, ...]) -> None:
        nonlocal offset
        size = math.prod(shape) * 4
        tensors[name] = TensorInfo(name, Path(f"/{tag}/model.safetensors"), offset, offset + size, "F32", shape)
        offset += size

    add("model.embed_tokens.weight", (16, 4))
    for i in range(n_layers):
        add(f"model.layers.{i}.mlp.up_proj.weight", (8, 4))
        add(f"model.layers.{i}.input_layernorm.weight", (4,))
    add("model.norm.weight", (4,))
    add("lm_head.weight", (16, 4))
    config = {"model_type": "llama", "num_hidden_layers": n_layers, "hidden_size": 4}
    return Checkpoint(tag, Path(f"/{tag}"), config, tensors, ())


@st.composite
def alignments(draw) -> Alignment:
    n_teacher = draw(st.integers(1, 40))
    rest = draw(st.sets(st.integers(1, n_teacher - 1), max_size=n_teacher - 1)) if n_teacher > 1 else set()
    return Alignment((0, *sorted(rest)), n_teacher)


@given(alignments(), st.data())
def test_plan_of_any_subset_is_a_consistent_model(alignment, data):
    teacher, student = _fake_llama(alignment.n_teacher, TEACHER), _fake_llama(alignment.n_student, STUDENT)
    pair = check_pair(layout_of(teacher), layout_of(student), alignment)
    patched = frozenset(data.draw(st.sets(st.integers(0, alignment.n_student - 1))))
    plan = make_plan(pair, patched)
    assert plan.n_layers == size_of(alignment, patched)
    names = [t.name for t in plan.tensors]
    assert len(names) == len(set(names)) == 3 + 2 * plan.n_layers
    teacher_layers = [layer.source_layer for layer in plan.layers if layer.model == TEACHER]
    assert teacher_layers == sorted(set(teacher_layers))
    positions = [alignment.copied[l.source_layer] if l.model == STUDENT else l.source_layer for l in plan.layers]
    assert positions == sorted(positions)  # layers keep the teacher's depth order
    for t in plan.tensors:
        assert t.source.file.parent.name == t.model
    if patched == frozenset(range(alignment.n_student)):
        assert {(t.name, t.source) for t in plan.tensors} == {(n, i) for n, i in teacher.tensors.items()}
    if not patched:
        assert {(t.name, t.source) for t in plan.tensors} == {(n, i) for n, i in student.tensors.items()}


@given(alignments(), st.lists(st.integers(-2, 45), max_size=5))
def test_bad_block_choices_raise_user_errors_only(alignment, blocks):
    from layersplice.planning.blocks import by_blocks, by_keep, by_layers, by_patch

    for call in (lambda: by_blocks(alignment, tuple(blocks)),
                 lambda: by_keep(alignment, blocks[0] if blocks else 0, "last"),
                 lambda: by_patch(alignment, blocks[0] if blocks else 0, "first"),
                 lambda: by_layers(alignment, blocks[0] if blocks else 0, "last")):
        try:
            call()
        except LayerspliceError:
            pass
