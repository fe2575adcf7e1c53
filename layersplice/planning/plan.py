"""Pure planning: (teacher layout, student layout, alignment, patched blocks) ->
every output tensor with the byte range it comes from. Touches no weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from layersplice.architectures.layout import Layout
from layersplice.architectures.names import NameMap, Parts, canonical_rows, parts_shape, translate
from layersplice.checkpoint.safetensors_format import DTYPE_SIZES, FLOAT_DTYPES, TensorInfo
from layersplice.errors import AlignmentError, ArchitectureError
from layersplice.planning.alignment import Alignment

TEACHER, STUDENT = "teacher", "student"


@dataclass(frozen=True)
class Pair:
    """A checked teacher/student pair and their alignment."""

    teacher: Layout
    student: Layout
    alignment: Alignment

    def layout(self, model: str) -> Layout:
        return self.teacher if model == TEACHER else self.student


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    source: TensorInfo
    model: str
    dtype: str
    # A fused tensor written from another family's split ones (Phi-3's
    # qkv_proj from Llama's q/k/v_proj): the sources whose rows follow source's.
    more_rows: tuple[TensorInfo, ...] = ()

    @property
    def parts(self) -> tuple[PlannedTensor, ...]:
        """Single source ranges, written one after another to make this tensor."""
        if not self.more_rows:
            return (self,)
        return tuple(PlannedTensor(self.name, s, self.model, self.dtype) for s in (self.source, *self.more_rows))

    @property
    def shape(self) -> tuple[int, ...]:
        return parts_shape((self.source, *self.more_rows))

    @property
    def numel(self) -> int:
        return self.source.numel + sum(s.numel for s in self.more_rows)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def is_copy(self) -> bool:
        return self.dtype == self.source.dtype


@dataclass(frozen=True)
class OutputLayer:
    index: int
    model: str
    source_layer: int
    block: int


@dataclass(frozen=True)
class Plan:
    patched: frozenset[int]
    layers: tuple[OutputLayer, ...]
    tensors: tuple[PlannedTensor, ...]
    embeddings_from: str
    head_from: str
    tied: bool

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def teacher_blocks(self) -> tuple[int, ...]:
        return tuple(sorted(self.patched))


def check_pair(teacher: Layout, student: Layout, alignment: Alignment, cast: str | None = None) -> Pair:
    """Check the alignment against both checkpoints before anything is written."""
    if teacher.canonical_family != student.canonical_family:
        raise AlignmentError(
            f"teacher is {teacher.family} ({teacher.prefix}) but student is {student.family} "
            f"({student.prefix}); both must be the same family, or families whose descriptions "
            "rename their tensors into the same family (names_as)"
        )
    if student.n_layers != alignment.n_student:
        raise AlignmentError(
            f"the student has {student.n_layers} layers but the alignment keeps "
            f"{alignment.n_student} teacher layers {list(alignment.copied)}"
        )
    layouts = {TEACHER: teacher, STUDENT: student}
    rows = _rows(layouts)
    if _same_names(teacher, student):
        _check_same("embedding", teacher.embeddings, student.embeddings, cast, hidden=True)
        _check_same("head", teacher.head, student.head, cast, hidden=False)
    else:
        _check_cross_family(layouts, rows, cast)
    # One family compares its own names, up to legacy spellings; two compare canonical ones.
    t_names, s_names = (
        (NameMap(legacy=teacher.layer_names.legacy), NameMap(legacy=student.layer_names.legacy))
        if teacher.family == student.family else (teacher.layer_names, student.layer_names)
    )
    for i, t in enumerate(alignment.copied):
        t_layer = _canonical(teacher.layer_tensors(t), t_names, rows, f"teacher layer {t}")
        s_layer = _canonical(student.layer_tensors(i), s_names, rows, f"student layer {i}")
        if set(t_layer) != set(s_layer):
            odd = sorted(set(t_layer) ^ set(s_layer))[0]
            raise AlignmentError(
                f"student layer {i} and teacher layer {t} hold different tensors (e.g. {odd!r})"
            )
        for suffix in sorted(t_layer):
            _check_tensor(f"layer {i} ↔ teacher layer {t}: {suffix}", _spec(t_layer[suffix]), _spec(s_layer[suffix]), cast)
    return Pair(teacher, student, alignment)


def _same_names(a: Layout, b: Layout) -> bool:
    return a.family == b.family and a.prefix == b.prefix


@dataclass(frozen=True)
class _Spec:
    """Shape and dtype of a tensor written from one or more row ranges."""

    shape: tuple[int, ...]
    dtype: str


def _spec(parts: Parts) -> _Spec:
    return _Spec(parts_shape(parts), parts[0].dtype)


def _check_cross_family(layouts: dict[str, Layout], rows: dict[str, int], cast: str | None) -> None:
    """Two families renamed into one (a pair distilled by others): same hidden size and
    vocabulary, and heads that stand in for each other in either family."""
    teacher, student = layouts[TEACHER], layouts[STUDENT]
    t_emb, s_emb = teacher.embeddings[0], student.embeddings[0]
    if t_emb.shape[-1:] != s_emb.shape[-1:]:
        raise AlignmentError(
            f"hidden sizes differ: teacher ({teacher.family}) {t_emb.name} is {list(t_emb.shape)}, student "
            f"({student.family}) {s_emb.name} is {list(s_emb.shape)}; no mapping between the two exists"
        )
    if t_emb.shape != s_emb.shape:
        raise AlignmentError(
            f"vocabularies differ: teacher {t_emb.name} is {list(t_emb.shape)}, student {s_emb.name} "
            f"is {list(s_emb.shape)}; the two models must share a tokenizer"
        )
    t_head = _canonical(teacher.head_untied(), teacher.head_names, rows, "the teacher's head")
    s_head = _canonical(student.head_untied(), student.head_names, rows, "the student's head")
    only_t, only_s = sorted(set(t_head) - set(s_head)), sorted(set(s_head) - set(t_head))
    if only_t or only_s:
        missing = [f"the teacher's {only_t[0]} has no counterpart in the student"] if only_t else []
        missing += [f"the student's {only_s[0]} has no counterpart in the teacher"] if only_s else []
        raise AlignmentError(
            f"the heads of the teacher ({teacher.family}) and the student ({student.family}) do not stand "
            f"in for each other: {'; '.join(missing)}"
        )
    for name in sorted(t_head):
        _check_tensor(f"head {name}", _spec(t_head[name]), _spec(s_head[name]), cast)


def _canonical(tensors: dict[str, TensorInfo], names: NameMap, rows: dict[str, int], what: str) -> dict[str, Parts]:
    """Tensors under their canonical names, fused ones cut: the names two families compare in."""
    try:
        return translate(tensors, names, NameMap(), rows)
    except ArchitectureError as exc:
        raise AlignmentError(f"{what}: {exc}") from None


def _check_same(what: str, teacher: tuple[TensorInfo, ...], student: tuple[TensorInfo, ...], cast: str | None, hidden: bool) -> None:
    t_by_name = {x.name: x for x in teacher}
    s_by_name = {x.name: x for x in student}
    for name in sorted(set(t_by_name) & set(s_by_name)):
        t, s = t_by_name[name], s_by_name[name]
        if hidden and t.shape[-1:] != s.shape[-1:]:
            raise AlignmentError(
                f"hidden sizes differ: teacher {name} is {list(t.shape)}, student {list(s.shape)}; "
                "a student must keep its teacher's hidden size"
            )
        _check_tensor(f"{what} {name}", t, s, cast)


def _check_tensor(what: str, t: TensorInfo | _Spec, s: TensorInfo | _Spec, cast: str | None) -> None:
    if t.shape != s.shape:
        raise AlignmentError(f"{what}: teacher shape {list(t.shape)} != student shape {list(s.shape)}")
    if t.dtype != s.dtype and not (cast and {t.dtype, s.dtype} <= FLOAT_DTYPES):
        raise AlignmentError(
            f"{what}: teacher is {t.dtype} but student is {s.dtype}; pass --dtype to write one dtype"
        )


def make_plan(pair: Pair, patched: frozenset[int], cast: str | None = None) -> Plan:
    """Every output tensor of the splice that patches `patched` blocks."""
    layers: list[OutputLayer] = []
    for block in range(pair.alignment.n_student):
        for model, source_layer in _block_sources(pair.alignment, block, block in patched):
            layers.append(OutputLayer(len(layers), model, source_layer, block))
    emb_from, head_from = _ends(pair.alignment, patched)
    layouts = {TEACHER: pair.teacher, STUDENT: pair.student}
    return _assemble(layouts, layers, emb_from, head_from, frozenset(patched), cast)


def _block_sources(alignment: Alignment, block: int, patched: bool) -> list[tuple[str, int]]:
    """(model, source layer) of the output layers standing for one block: its
    teacher layers when it is patched, else the student layer it was distilled into."""
    start, end = alignment.blocks[block]
    return [(TEACHER, t) for t in range(start, end)] if patched else [(STUDENT, block)]


def _ends(alignment: Alignment, patched: frozenset[int]) -> tuple[str, str]:
    """The models the embeddings and the final norm + head come from (METHOD.md §4)."""
    emb_from = TEACHER if 0 in patched else STUDENT
    head_from = TEACHER if alignment.n_student - 1 in patched else STUDENT
    return emb_from, head_from


@dataclass(frozen=True)
class PlanSize:
    """What `plan` shows of one splice, without its tensors."""

    patched: frozenset[int]
    n_layers: int
    params: int
    nbytes: int
    embeddings_from: str
    head_from: str

    @property
    def teacher_blocks(self) -> tuple[int, ...]:
        return tuple(sorted(self.patched))


class SizeTable:
    """Parameters and bytes of any splice of a pair, summed from per-group totals.

    A plan lists every tensor; `plan` shows every size of models with up to
    thousands of layers, so it adds up the same groups _assemble writes (the
    embeddings, each source layer in the output family's names, the head),
    each totalled once.
    """

    def __init__(self, pair: Pair, cast: str | None = None) -> None:
        self._pair, self._cast = pair, cast
        self._layouts = {TEACHER: pair.teacher, STUDENT: pair.student}
        self._rows = _rows(self._layouts)
        self._totals: dict[tuple, tuple[int, int, int]] = {}
        self._block_totals: dict[str, tuple[list, list]] = {}

    def size(self, patched: frozenset[int]) -> PlanSize:
        emb_from, head_from = _ends(self._pair.alignment, patched)
        as_student, as_teacher = self._blocks(emb_from)
        totals = [as_teacher[b] if b in patched else as_student[b] for b in range(len(as_student))]
        totals.append(self._total(("embeddings", emb_from), lambda: _embedding_parts(self._layouts, emb_from)))
        head = lambda: [p for _, p in _head_parts(self._layouts, emb_from, head_from, self._rows)]  # noqa: E731
        totals.append(self._total(("head", emb_from, head_from), head))
        n_layers, params, nbytes = map(sum, zip(*totals))
        return PlanSize(frozenset(patched), n_layers, params, nbytes, emb_from, head_from)

    def _blocks(self, emb_from: str) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """(layers, parameters, bytes) of each block left as the student's, and patched."""
        if emb_from in self._block_totals:
            return self._block_totals[emb_from]

        def block(b: int, patched: bool) -> tuple[int, int, int]:
            layers = [
                self._total(("layer", model, index, emb_from),
                            lambda: _layer_in(self._layouts, model, index, emb_from, self._rows).values())
                for model, index in _block_sources(self._pair.alignment, b, patched)
            ]
            return tuple(map(sum, zip(*layers)))

        blocks = range(self._pair.alignment.n_student)
        self._block_totals[emb_from] = [block(b, False) for b in blocks], [block(b, True) for b in blocks]
        return self._block_totals[emb_from]

    def _total(self, key: tuple, group: Callable[[], Iterable[Parts]]) -> tuple[int, int, int]:
        """(layers, parameters, bytes) of one group of tensors: a layer, or an end (0 layers)."""
        if key not in self._totals:
            numel = nbytes = 0
            for parts in group():
                count = sum(t.numel for t in parts)
                numel += count
                nbytes += count * DTYPE_SIZES[_output_dtype(parts[0].dtype, self._cast)]
            self._totals[key] = (int(key[0] == "layer"), numel, nbytes)
        return self._totals[key]


def student_init_plan(teacher: Layout, alignment: Alignment, cast: str | None = None) -> Plan:
    """The initial student: the kept teacher layers, renumbered, with the teacher's embeddings and head."""
    return pruned_teacher_plan(teacher, alignment, frozenset(), cast)


def pruned_teacher_plan(teacher: Layout, alignment: Alignment, patched: frozenset[int], cast: str | None = None) -> Plan:
    """The naive baseline of METHOD.md §1: the teacher alone, each unpatched block cut
    down to its kept layer. It has the size and layer selection of make_plan's splice
    with the same blocks patched, but no distilled layer."""
    layers: list[OutputLayer] = []
    for block, (start, end) in enumerate(alignment.blocks):
        kept = range(start, end) if block in patched else (start,)
        layers.extend(OutputLayer(len(layers), TEACHER, t, block) for t in kept)
    return _assemble({TEACHER: teacher}, layers, TEACHER, TEACHER, frozenset(patched), cast)


def _assemble(
    layouts: dict[str, Layout], layers: list[OutputLayer], emb_from: str, head_from: str,
    patched: frozenset[int], cast: str | None,
) -> Plan:
    """Every tensor under the names of the output family: the family of the embeddings' model."""
    def planned(name: str, parts: Parts, model: str) -> PlannedTensor:
        return PlannedTensor(name, parts[0], model, _output_dtype(parts[0].dtype, cast), parts[1:])

    out, rows = layouts[emb_from], _rows(layouts)
    tensors = [planned(parts[0].name, parts, emb_from) for parts in _embedding_parts(layouts, emb_from)]
    for layer in layers:
        tensors += [
            planned(out.layer_name(layer.index, suffix), parts, layer.model)
            for suffix, parts in _layer_in(layouts, layer.model, layer.source_layer, emb_from, rows).items()
        ]
    tensors += [planned(name, parts, head_from) for name, parts in _head_parts(layouts, emb_from, head_from, rows)]
    tied = out.tied and emb_from == head_from
    return Plan(patched, tuple(layers), tuple(tensors), emb_from, head_from, tied)


def _output_dtype(dtype: str, cast: str | None) -> str:
    return cast if cast and dtype in FLOAT_DTYPES else dtype


def _embedding_parts(layouts: dict[str, Layout], emb_from: str) -> list[Parts]:
    return [(t,) for t in layouts[emb_from].embeddings]


def _head_parts(layouts: dict[str, Layout], emb_from: str, head_from: str, rows: dict[str, int]) -> list[tuple[str, Parts]]:
    """(name, parts) of the final norm and head, named as the output family names them."""
    if emb_from == head_from:
        return [(t.name, (t,)) for t in layouts[head_from].head]
    # The head's model is not the embeddings' model: spell out its ties (the tied
    # matrix is not the one we write) and name it as the output family does.
    return list(_head_in(layouts, head_from, emb_from, rows).items())


def _layer_in(layouts: dict[str, Layout], model: str, index: int, out: str, rows: dict[str, int]) -> dict[str, Parts]:
    """Layer `index` of `model`, by suffix in the family of `out`."""
    src, dst = layouts[model], layouts[out]
    if _same_names(src, dst):
        return {src.suffix(t): (t,) for t in src.layers[index]}
    try:
        return translate(src.layer_tensors(index), src.layer_names, dst.own_layer_names, rows)
    except ArchitectureError as exc:
        raise AlignmentError(f"{model} layer {index} ({src.family}) in {dst.family} names: {exc}") from None


def _head_in(layouts: dict[str, Layout], model: str, out: str, rows: dict[str, int]) -> dict[str, Parts]:
    """The head of `model`, its ties spelled out, in the family of `out`."""
    src, dst = layouts[model], layouts[out]
    head = src.head_untied()
    if _same_names(src, dst):
        return dst.add_tied_alongside({name: (t,) for name, t in head.items()})
    try:
        return dst.add_tied_alongside(translate(head, src.head_names, dst.own_head_names, rows))
    except ArchitectureError as exc:
        raise AlignmentError(f"the {model}'s head ({src.family}) in {dst.family} names: {exc}") from None


def _rows(layouts: dict[str, Layout]) -> dict[str, int]:
    """Row counts of canonical tensors, for cutting fused ones (names.canonical_rows)."""
    if len({layout.family for layout in layouts.values()}) == 1:
        return {}
    sets, maps = [], []
    for layout in layouts.values():
        sets += [layout.layer_tensors(i) for i in range(layout.n_layers)] + [layout.head_untied()]
        maps += [layout.layer_names] * layout.n_layers + [layout.head_names]
    return canonical_rows(sets, maps)
