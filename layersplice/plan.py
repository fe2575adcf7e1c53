"""Pure planning: (teacher layout, student layout, alignment, patched blocks) ->
every output tensor with the byte range it comes from. Touches no weight."""

from __future__ import annotations

from dataclasses import dataclass

from layersplice.alignment import Alignment
from layersplice.architectures.layout import Layout
from layersplice.checkpoint.safetensors_format import DTYPE_SIZES, FLOAT_DTYPES, TensorInfo
from layersplice.errors import AlignmentError

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

    @property
    def nbytes(self) -> int:
        return self.source.numel * DTYPE_SIZES[self.dtype]

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
        return sum(t.source.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def teacher_blocks(self) -> tuple[int, ...]:
        return tuple(sorted(self.patched))


def check_pair(teacher: Layout, student: Layout, alignment: Alignment, cast: str | None = None) -> Pair:
    """Check the alignment against both checkpoints before anything is written."""
    if teacher.family != student.family or teacher.prefix != student.prefix:
        raise AlignmentError(
            f"teacher is {teacher.family} ({teacher.prefix}) but student is {student.family} "
            f"({student.prefix}); both must be the same family"
        )
    if student.n_layers != alignment.n_student:
        raise AlignmentError(
            f"the student has {student.n_layers} layers but the alignment keeps "
            f"{alignment.n_student} teacher layers {list(alignment.copied)}"
        )
    _check_same("embedding", teacher.embeddings, student.embeddings, cast, hidden=True)
    _check_same("head", teacher.head, student.head, cast, hidden=False)
    for i, t in enumerate(alignment.copied):
        t_layer = {teacher.suffix(x): x for x in teacher.layers[t]}
        s_layer = {student.suffix(x): x for x in student.layers[i]}
        if set(t_layer) != set(s_layer):
            odd = sorted(set(t_layer) ^ set(s_layer))[0]
            raise AlignmentError(
                f"student layer {i} and teacher layer {t} hold different tensors (e.g. {odd!r})"
            )
        for suffix in sorted(t_layer):
            _check_tensor(f"layer {i} ↔ teacher layer {t}: {suffix}", t_layer[suffix], s_layer[suffix], cast)
    return Pair(teacher, student, alignment)


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


def _check_tensor(what: str, t: TensorInfo, s: TensorInfo, cast: str | None) -> None:
    if t.shape != s.shape:
        raise AlignmentError(f"{what}: teacher shape {list(t.shape)} != student shape {list(s.shape)}")
    if t.dtype != s.dtype and not (cast and {t.dtype, s.dtype} <= FLOAT_DTYPES):
        raise AlignmentError(
            f"{what}: teacher is {t.dtype} but student is {s.dtype}; pass --dtype to write one dtype"
        )


def make_plan(pair: Pair, patched: frozenset[int], cast: str | None = None) -> Plan:
    """Every output tensor of the splice that patches `patched` blocks."""
    last = pair.alignment.n_student - 1
    layers: list[OutputLayer] = []
    for block, (start, end) in enumerate(pair.alignment.blocks):
        sources = [(TEACHER, t) for t in range(start, end)] if block in patched else [(STUDENT, block)]
        layers.extend(OutputLayer(len(layers), m, src, block) for m, src in sources)
    layouts = {TEACHER: pair.teacher, STUDENT: pair.student}
    emb_from = TEACHER if 0 in patched else STUDENT
    head_from = TEACHER if last in patched else STUDENT
    return _assemble(layouts, layers, emb_from, head_from, frozenset(patched), cast)


def student_init_plan(teacher: Layout, alignment: Alignment, cast: str | None = None) -> Plan:
    """The initial student: the kept teacher layers, renumbered, with the teacher's embeddings and head."""
    layers = [OutputLayer(i, TEACHER, t, i) for i, t in enumerate(alignment.copied)]
    return _assemble({TEACHER: teacher}, layers, TEACHER, TEACHER, frozenset(), cast)


def _assemble(
    layouts: dict[str, Layout], layers: list[OutputLayer], emb_from: str, head_from: str,
    patched: frozenset[int], cast: str | None,
) -> Plan:
    def planned(name: str, info: TensorInfo, model: str) -> PlannedTensor:
        dtype = cast if cast and info.dtype in FLOAT_DTYPES else info.dtype
        return PlannedTensor(name, info, model, dtype)

    emb, head = layouts[emb_from], layouts[head_from]
    tensors = [planned(t.name, t, emb_from) for t in emb.embeddings]
    for out in layers:
        src = layouts[out.model]
        tensors += [
            planned(src.layer_name(out.index, src.suffix(t)), t, out.model)
            for t in src.layers[out.source_layer]
        ]
    tensors += [planned(t.name, t, head_from) for t in head.head]
    tied = emb.tied and emb_from == head_from
    if head.tied and not tied:
        # The head ties to an embedding that is not the one we write: give it its own tensor.
        tensors.append(planned(head.tied_head_name, head.tied_embedding(), head_from))
    return Plan(patched, tuple(layers), tuple(tensors), emb_from, head_from, tied)
