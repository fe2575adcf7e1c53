"""Plan a transfer (METHOD.md §7): the student of a post-trained variant V of the
base teacher B, from the student S distilled from B, without distilling again:

    S_V = init(V) + (S - init(B))

init(X) is the student `init-student` makes from X with S's alignment. Every
tensor of S becomes V[t] + (S[s] - B[t]), t being the teacher tensor that
init-student copies into s. Touches no weight: the plan lists, for each
output tensor, the three source tensors it is computed from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from layersplice.architectures.layout import Layout, layout_of
from layersplice.checkpoint.delta import DeltaTensor
from layersplice.checkpoint.safetensors_format import FLOAT_DTYPES
from layersplice.checkpoint.source import Checkpoint, declare_hub_id, open_checkpoint
from layersplice.errors import AlignmentError
from layersplice.planning.alignment import Alignment, AlignmentSpec, student_alignment
from layersplice.planning.plan import Plan, check_pair, student_init_plan

BASE, VARIANT, STUDENT = "base_teacher", "teacher", "student"
EMBEDDINGS, HEAD = "embeddings", "head"


class TransferError(AlignmentError):
    """The three models do not fit together as base teacher, variant and student."""


@dataclass(frozen=True)
class Model:
    checkpoint: Checkpoint
    layout: Layout


@dataclass(frozen=True)
class Transfer:
    """Three checked models, their alignment, and every output tensor."""

    models: dict[str, Model]
    alignment: Alignment
    alignment_origin: str
    tensors: tuple[DeltaTensor, ...]
    groups: dict[str, str]  # output tensor -> "embeddings", "head" or the student layer's index
    variant_init: Plan  # init(V): the layers and names the output config describes
    notes: tuple[str, ...] = ()  # for the user, e.g. that --override-alignment replaced the student's record

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def describe_sources(self) -> dict:
        return {role: m.checkpoint.describe() for role, m in sorted(self.models.items())}


def open_transfer(
    references: dict[str, str], revisions: dict[str, str | None], specs: list[AlignmentSpec],
    arch_file: Path | None = None, allow_pickle: bool = False, override_alignment: bool = False,
    hub_ids: dict[str, str | None] | None = None,
) -> Transfer:
    """Open base teacher, variant and student (paths or hub ids) and plan the transfer.

    `override_alignment`: accept an alignment that contradicts the student's student_config.json.
    `hub_ids`: the Hub repo each role's local copy came from (--base-teacher-id, --teacher-id, --student-id)."""
    models = {}
    for role in (BASE, VARIANT, STUDENT):
        checkpoint = open_checkpoint(references[role], revisions.get(role), allow_pickle)
        checkpoint = declare_hub_id(checkpoint, (hub_ids or {}).get(role), f"--{role.replace('_', '-')}-id")
        models[role] = Model(checkpoint, layout_of(checkpoint, arch_file))
    alignment, origin, overridden = student_alignment(
        specs, models[BASE].layout.n_layers, models[STUDENT].checkpoint.directory, override_alignment
    )
    planned = plan_transfer(models, alignment, origin)
    return dataclasses.replace(planned, notes=(overridden,)) if overridden else planned


def plan_transfer(models: dict[str, Model], alignment: Alignment, origin: str) -> Transfer:
    """Check the three models against each other, then pair up every output tensor's sources."""
    base, variant, student = models[BASE], models[VARIANT], models[STUDENT]
    check_variant(base, variant)
    base_init = student_init_plan(base.layout, alignment)
    variant_init = student_init_plan(variant.layout, alignment)
    _check_student(base, student, alignment, base_init)
    from_variant = {t.name: t.source for t in variant_init.tensors}
    tensors = tuple(
        DeltaTensor(t.name, student.checkpoint.tensors[t.name], t.source, from_variant[t.name],
                    student.checkpoint.tensors[t.name].dtype)
        for t in base_init.tensors
    )
    return Transfer(models, alignment, origin, tensors, _groups(student.layout), variant_init)


def check_variant(base: Model, variant: Model) -> None:
    """The variant must be the base teacher post-trained: same family, names, shapes and dtypes."""
    b, v = base.layout, variant.layout
    if b.family != v.family:
        raise TransferError(f"the base teacher is {b.family} but the teacher (variant) is {v.family}; "
                            "a variant must be a post-trained copy of the base teacher")
    if b.n_layers != v.n_layers:
        raise TransferError(f"the base teacher has {b.n_layers} layers but the teacher (variant) has {v.n_layers}")
    if b.tied != v.tied:
        raise TransferError(
            f"the base teacher {'ties' if b.tied else 'does not tie'} its head to the embeddings but the "
            f"teacher (variant) {'does' if v.tied else 'does not'}"
        )
    b_emb, v_emb = b.embeddings[0].shape, v.embeddings[0].shape
    if b_emb[-1:] != v_emb[-1:]:
        raise TransferError(f"hidden sizes differ: base teacher {b_emb[-1]}, teacher (variant) {v_emb[-1]}")
    if b_emb != v_emb:
        raise TransferError(f"vocabularies differ: base teacher {b_emb[0]} tokens, teacher (variant) {v_emb[0]}")
    b_tensors, v_tensors = base.checkpoint.tensors, variant.checkpoint.tensors
    if set(b_tensors) != set(v_tensors):
        name = sorted(set(b_tensors) ^ set(v_tensors))[0]
        where, missing = ("base teacher", "teacher (variant)") if name in b_tensors else ("teacher (variant)", "base teacher")
        raise TransferError(f"tensor {name!r} is in the {where} but not in the {missing}")
    for name in sorted(b_tensors):
        bt, vt = b_tensors[name], v_tensors[name]
        if bt.shape != vt.shape:
            raise TransferError(f"{name}: base teacher shape {list(bt.shape)} != teacher (variant) shape {list(vt.shape)}")
        if bt.dtype != vt.dtype:
            raise TransferError(f"{name}: base teacher is {bt.dtype} but the teacher (variant) is {vt.dtype}")


def _check_student(base: Model, student: Model, alignment: Alignment, base_init: Plan) -> None:
    """S must hold exactly init(B)'s tensors, in floating dtypes (its own dtype is kept)."""
    s_tensors = student.checkpoint.tensors
    dtypes = {t.dtype for t in s_tensors.values()} | {t.source.dtype for t in base_init.tensors}
    odd = sorted(dtypes - FLOAT_DTYPES)
    if odd:
        raise TransferError(f"transfer computes in float32 and cannot add {odd[0]} tensors; "
                            "every tensor of the teacher and the student must be floating point")
    # The student may be stored in another floating dtype than the base teacher (the output keeps the
    # student's): checked as a pair whose output is cast, here to the float32 the arithmetic runs in.
    try:
        check_pair(base.layout, student.layout, alignment, cast="F32")
    except AlignmentError as exc:
        raise TransferError(f"the student does not match the base teacher's kept layers: {exc}") from None
    planned = {t.name: t for t in base_init.tensors}
    if set(planned) != set(s_tensors):
        name = sorted(set(planned) ^ set(s_tensors))[0]
        problem = (f"the student has {name!r}, which init-student of the base teacher does not make"
                   if name in s_tensors else f"the student has no {name!r}, which init-student of the base teacher makes")
        tying = " (a tied head in one and not the other)" if base.layout.tied != student.layout.tied else ""
        raise TransferError(f"the student does not match the base teacher's kept layers: {problem}{tying}")
    for name in sorted(planned):
        if planned[name].shape != s_tensors[name].shape:
            raise TransferError(
                f"the student does not match the base teacher's kept layers: {name} is {list(s_tensors[name].shape)} "
                f"in the student, {list(planned[name].shape)} in the base teacher"
            )
    if any(t.more_rows for t in base_init.tensors):
        raise TransferError("transfer needs the student in its teacher's own tensor names (one family)")


def _groups(student: Layout) -> dict[str, str]:
    groups = {t.name: EMBEDDINGS for t in student.embeddings}
    groups.update({t.name: HEAD for t in student.head if t.name not in groups})
    for index, layer in enumerate(student.layers):
        groups.update({t.name: str(index) for t in layer})
    return groups
