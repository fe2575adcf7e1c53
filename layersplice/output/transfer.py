"""Execute a transfer plan: write init(V) + (S - init(B)) as a sealed student
checkpoint, and measure how alike the two changes are (METHOD.md §7)."""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass
from pathlib import Path

from layersplice import __version__
from layersplice.checkpoint.atomic import atomic_directory
from layersplice.checkpoint.delta import Products
from layersplice.checkpoint.sealed_json import write_sealed
from layersplice.checkpoint.writer import ProgressFn, SourceFiles
from layersplice.output.build import write_checkpoint
from layersplice.output.card import (
    CARD_FILE, PAPER, CardFacts, output_arguments, render, shown_name, source_arguments, teacher_license,
)
from layersplice.output.family import file_record
from layersplice.output.verify import PROVENANCE_FILE
from layersplice.planning.alignment import STUDENT_CONFIG_NAME
from layersplice.planning.configs import spliced_config
from layersplice.planning.plan import TEACHER
from layersplice.planning.transfer import BASE, EMBEDDINGS, HEAD, STUDENT, VARIANT, Transfer

KIND = "transfer"
FORMULA = (
    "teacher + (student - base_teacher), in float32 in that order, rounded to the student's dtype "
    "(nearest even); the student's own value where teacher = base_teacher"
)


class Similarity:
    """Adds up the chunks' products of the two changes, V - B and S - init(B).

    Chunks arrive from worker threads in any order; they are kept by (tensor,
    first element) and summed in plan order, so the figures are the same in
    every run."""

    def __init__(self) -> None:
        self._chunks: dict[str, dict[int, Products]] = {}
        self._lock = threading.Lock()

    def add(self, name: str, first: int, products: Products) -> None:
        with self._lock:
            self._chunks.setdefault(name, {})[first] = products

    def summary(self, transfer: Transfer) -> dict:
        """Cosine similarity in total, of the embeddings, the final norm + head and each student layer."""
        by_group: dict[str, list[float]] = {}
        for tensor in transfer.tensors:
            sums = by_group.setdefault(transfer.groups[tensor.name], [0.0, 0.0, 0.0])
            chunks = self._chunks.get(tensor.name, {})
            for first in sorted(chunks):
                for i, value in enumerate(chunks[first]):
                    sums[i] += value
        total = [sum(sums[i] for sums in by_group.values()) for i in range(3)]
        layers = [
            {"layer": i, "teacher_layer": t, "cosine": _cosine(by_group.get(str(i)))}
            for i, t in enumerate(transfer.alignment.copied)
        ]
        return {
            "total": _cosine(total),
            EMBEDDINGS: _cosine(by_group.get(EMBEDDINGS)),
            HEAD: _cosine(by_group.get(HEAD)),
            "layers": layers,
            "of": "teacher - base_teacher against student - init(base_teacher)",
        }


def _cosine(sums: list[float] | None) -> float | None:
    """dot / (|a| |b|), or None where either change is zero (V = B: nothing to compare)."""
    if not sums or sums[1] <= 0 or sums[2] <= 0:
        return None
    return sums[0] / math.sqrt(sums[1] * sums[2])


@dataclass(frozen=True)
class Transferred:
    directory: Path
    files: dict[str, dict]
    similarity: dict
    params: int


def write_transfer(
    transfer: Transfer, out: Path, shard_size: int, force: bool, progress: ProgressFn | None = None,
    card: bool = True, hub_owner: str | None = None,
) -> Transferred:
    """Stream every output tensor into `out`, atomically, with config, tokenizer, model card and provenance."""
    similarity = Similarity()
    tensors = [dataclasses.replace(t, sink=similarity.add) for t in transfer.tensors]
    variant = transfer.models[VARIANT]
    dtypes = {t.dtype for t in tensors}
    cast = next(iter(dtypes)) if len(dtypes) == 1 and dtypes != {t.variant.dtype for t in tensors} else None
    config, rewritten = spliced_config(
        {TEACHER: variant.layout}, transfer.variant_init, {TEACHER: variant.checkpoint.config}, cast
    )
    inputs = [(f"the {role.replace('_', ' ')}", model.checkpoint.directory) for role, model in sorted(transfer.models.items())]
    with atomic_directory(out, force, inputs=inputs) as tmp, SourceFiles() as sources:
        # The variant's tokenizer, chat template and generation settings: the output is its student.
        files = write_checkpoint(tmp, tensors, config, variant.checkpoint.directory, shard_size, sources, progress,
                                 extra_json={STUDENT_CONFIG_NAME: transfer.alignment.student_config()})
        summary = similarity.summary(transfer)
        if card:  # written once the similarity, which it reports, is known
            (tmp / CARD_FILE).write_text(
                transfer_card(transfer, config, shard_size, out.name, summary["total"], hub_owner), encoding="utf-8")
            files = {**files, CARD_FILE: file_record(tmp / CARD_FILE)}
        write_sealed(tmp / PROVENANCE_FILE, {
            "layersplice_version": __version__,
            "kind": KIND,
            "formula": FORMULA,
            "sources": transfer.describe_sources(),
            "alignment": {
                "copied_teacher_layers": list(transfer.alignment.copied),
                "teacher_layers": transfer.alignment.n_teacher,
                "from": transfer.alignment_origin,
            },
            "dtype": cast,
            "delta_similarity": summary,
            "per_layer_config": rewritten,
            "parameters": transfer.params,
            "files": files,
        })
    return Transferred(out, files, summary, transfer.params)


def transfer_card(transfer: Transfer, config: dict, shard_size: int, name: str, cosine: float | None,
                  hub_owner: str | None) -> str:
    """The card of a transferred student: a merge of the variant, the student and the base teacher."""
    base, variant, student = (transfer.models[role].checkpoint for role in (BASE, VARIANT, STUDENT))
    command = [
        "layersplice", "transfer", *source_arguments(base, "--base-teacher", "--base-teacher-revision"),
        *source_arguments(variant, "--teacher", "--teacher-revision"),
        *source_arguments(student, "--student", "--student-revision"),
        "--copied-teacher-layers", ",".join(map(str, transfer.alignment.copied)),
        *output_arguments(None, shard_size, name),
    ]
    agreement = "n/a (the variant equals the base teacher)" if cosine is None else f"{cosine:.4f}"
    what = (
        f"The student of `{shown_name(variant)}` for [boomerang distillation]({PAPER}), made with no training "
        f"by `layersplice transfer` (ADAPT): the student `{shown_name(student)}` was distilled from the base "
        f"teacher `{shown_name(base)}`, and every tensor here is the variant's plus what distillation changed, "
        f"teacher + (student - base teacher), at the layers the student keeps. The cosine similarity of the "
        f"variant's change and the distilled change is {agreement} (the lower, the less the transfer can be "
        f"trusted). Every size of the variant's family: `layersplice build --teacher {shown_name(variant)} "
        f"--student {name} --all`."
    )
    facts = CardFacts(name, what, (variant, student, base), transfer.variant_init, config, command, hub_owner,
                      made_of="teacher + (student - base teacher)")
    return render(facts, teacher_license(variant))
