"""Perplexity of every size of a family on held-out text.

Perplexity is token-weighted: exp(total next-token NLL / tokens predicted),
over the text cut into fixed --seq-len windows (the last one padded and
masked), run a batch of windows at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from layersplice.checkpoint.sealed_json import read_sealed
from layersplice.distill.config import DataSpec
from layersplice.distill.data import Batch, eos_tokenizer, pack_padded, token_documents
from layersplice.distill.losses import cross_entropy_loss
from layersplice.distill.sources import open_corpus
from layersplice.errors import LayerspliceError
from layersplice.evaluation.in_memory import LoadedPair, compute_dtype, pick_device
from layersplice.output.verify import MANIFEST_FILE
from layersplice.planning.blocks import Order
from layersplice.planning.job import Job
from layersplice.planning.plan import Plan
from layersplice.planning.sizes import family_sizes

STUDENT_ROLE, INTERPOLATED_ROLE, TEACHER_ROLE = "student", "interpolated", "teacher"


@dataclass(frozen=True)
class EvalText:
    """Held-out text as fixed-length windows of the teacher's tokens."""

    path: Path
    windows: Batch
    tokens: int
    seq_len: int

    def describe(self) -> dict:
        return {"path": str(self.path), "tokens": self.tokens, "seq_len": self.seq_len,
                "windows": len(self.windows.ids)}


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise LayerspliceError(f"{directory}: no usable tokenizer ({exc}); evaluation tokenizes with the teacher's") from None


def load_text(path: Path, tokenizer, seq_len: int, max_tokens: int | None, text_field: str = "text") -> EvalText:
    """The first `max_tokens` tokens of a .txt/.jsonl/.parquet file or folder, documents joined by EOS."""
    corpus = open_corpus(DataSpec(files=(path,), text_field=text_field, seq_len=seq_len))
    tokens: list[int] = []
    for document in token_documents(corpus, eos_tokenizer(tokenizer), 0):
        tokens.extend(document)
        if max_tokens is not None and len(tokens) >= max_tokens:
            break
    tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise LayerspliceError(f"{path}: fewer than 2 tokens of text; give a longer held-out file")
    return EvalText(path, pack_padded(tokens, seq_len, tokenizer.eos_token_id), len(tokens), seq_len)


def window_batches(text: EvalText, batch_size: int, device: torch.device):
    """(ids, mask) for each batch of windows, on `device`."""
    for start in range(0, len(text.windows.ids), batch_size):
        yield (text.windows.ids[start : start + batch_size].to(device),
               text.windows.mask[start : start + batch_size].to(device))


def predicted(mask: torch.Tensor) -> int:
    """Positions whose next token is real text: what a window's NLL is averaged over."""
    return int((mask[:, :-1] & mask[:, 1:]).sum())


@torch.inference_mode()
def negative_log_likelihood(model, text: EvalText, batch_size: int, device: torch.device) -> tuple[float, int]:
    """(summed next-token NLL in nats, tokens predicted)."""
    total, count = 0.0, 0
    for ids, mask in window_batches(text, batch_size, device):
        logits = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
        n = predicted(mask)
        total += float(cross_entropy_loss(logits, ids, mask)) * n
        count += n
    return total, count


@dataclass(frozen=True)
class SizeResult:
    """One size's perplexity, and the naive baseline's at the same layer selection."""

    role: str
    layers: int
    parameters: int
    bytes: int
    keep: int | None
    patched_blocks: tuple[int, ...]
    perplexity: float
    tokens: int
    non_embedding_parameters: int  # the layers and the final norm: what the layer count drives, tied head or not
    naive_perplexity: float | None = None
    naive_parameters: int | None = None  # the teacher's tied head stays tied when no student part joins it

    @property
    def margin(self) -> float | None:
        """How much worse naive layer dropping is at this size (perplexity points)."""
        return None if self.naive_perplexity is None else self.naive_perplexity - self.perplexity


def by_size(size: tuple[int | None, Plan]) -> tuple[int, int]:
    """Layers, then parameters: a spliced head of its own can give a model more parameters than the tied teacher."""
    return size[1].n_layers, size[1].params


def role_of(plan: Plan, n_student: int) -> str:
    if not plan.patched:
        return STUDENT_ROLE
    return TEACHER_ROLE if len(plan.patched) == n_student else INTERPOLATED_ROLE


def evaluate_sizes(
    sizes: list[tuple[int | None, Plan]],
    n_student: int,
    model_for: Callable[[Plan], object],
    naive_for: Callable[[Plan], object] | None,
    text: EvalText,
    batch_size: int,
    device: torch.device,
    on_size: Callable[[str], None] | None = None,
) -> list[SizeResult]:
    """Perplexity of each (keep, plan), fewest layers first; each model is released before the next."""
    results = []
    for keep, plan in sorted(sizes, key=by_size):
        if on_size:
            on_size(f"{plan.n_layers} layers")
        role = role_of(plan, n_student)
        model = model_for(plan)
        perplexity, count = _perplexity(model, text, batch_size, device)
        core = non_embedding_parameters(model)
        naive = naive_params = None
        if naive_for is not None and role == TEACHER_ROLE:
            naive, naive_params = perplexity, plan.params  # dropping no layer is the teacher itself
        elif naive_for is not None:
            model = naive_for(plan)
            naive, naive_params = _perplexity(model, text, batch_size, device)[0], model.num_parameters()
        results.append(SizeResult(
            role, plan.n_layers, plan.params, plan.nbytes, keep, plan.teacher_blocks, perplexity, count, core,
            naive, naive_params,
        ))
    return results


def non_embedding_parameters(model) -> int:
    """Parameters outside the input embeddings and the LM head (counted once when tied)."""
    ends = (model.get_input_embeddings(), model.get_output_embeddings())
    skipped = {id(p) for module in ends if module is not None for p in module.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skipped)


def _perplexity(model, text: EvalText, batch_size: int, device: torch.device) -> tuple[float, int]:
    total, count = negative_log_likelihood(model, text, batch_size, device)
    return math.exp(total / count), count


@dataclass(frozen=True)
class EvalRequest:
    """What `eval` was asked to measure, and how."""

    data: Path | None = None
    sizes: str = "all"
    baseline: bool = False
    models_dir: Path | None = None
    seq_len: int = 512
    batch_size: int = 8
    max_tokens: int | None = None
    device: str = "auto"
    text_field: str = "text"
    data_name: str | None = None  # how reports and cards name the data; default: the file's name

    @property
    def data_label(self) -> str:
        return self.data_name or (self.data.name if self.data is not None else "")


@dataclass(frozen=True)
class FamilyModels:
    """The sizes to evaluate and where each one's model comes from."""

    sizes: list[tuple[int | None, Plan]]
    model_for: Callable[[Plan], object]
    loaded: LoadedPair
    n_student: int

    def describe(self, request: EvalRequest) -> dict:
        return {
            "models": str(request.models_dir) if request.models_dir else "assembled in memory",
            "device": self.loaded.device.type,
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
        }


def family_models(job: Job, order: Order, request: EvalRequest) -> FamilyModels:
    device = pick_device(request.device)
    dtype = compute_dtype(job, device)
    loaded = LoadedPair(job, device, dtype)
    sizes = family_sizes(job, order, request.sizes)
    if request.models_dir is None:
        model_for = loaded.model
    else:
        sizes, model_for = built_model_loader(request.models_dir, sizes, dtype, device, request.sizes == "all")
    return FamilyModels(sizes, model_for, loaded, job.pair.alignment.n_student)


def evaluate_family(job: Job, order: Order, request: EvalRequest, on_size=None) -> tuple[list[SizeResult], dict]:
    """Perplexity of each requested size (and of its naive baseline); (results, run description)."""
    family = family_models(job, order, request)
    loaded = family.loaded
    naive_for = (lambda plan: loaded.naive(plan.patched)) if request.baseline else None
    limit = job.teacher.config.get("max_position_embeddings") or request.seq_len
    text = load_text(request.data, load_tokenizer(job.teacher.directory), min(request.seq_len, limit),
                     request.max_tokens, request.text_field)
    results = evaluate_sizes(family.sizes, family.n_student, family.model_for, naive_for, text,
                             request.batch_size, loaded.device, on_size)
    meta = {"data": text.describe(), "baseline": "naive" if request.baseline else None, **family.describe(request)}
    return results, meta


def built_model_loader(directory: Path, sizes: list[tuple[int | None, Plan]], dtype: torch.dtype, device: torch.device,
                       held_only: bool = False):
    """(the sizes, a model_for that reads each from a `build --all` output, checked against its manifest).

    `held_only`: of `sizes`, keep those the output holds (a family built in part), instead of requiring all."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    manifest, problem = read_sealed(directory / MANIFEST_FILE)
    if problem:
        raise LayerspliceError(f"--models {directory}: {problem}; give the output of `layersplice build --all`")
    by_blocks = {tuple(entry["patched_blocks"]): directory / entry["directory"] for entry in manifest["sizes"]}
    if held_only:
        sizes = [size for size in sizes if size[1].teacher_blocks in by_blocks] or sizes
    for _, plan in sizes:
        if plan.teacher_blocks not in by_blocks:
            raise LayerspliceError(
                f"--models {directory}: no size patches blocks {list(plan.teacher_blocks)} ({plan.n_layers} layers); "
                "build it with the same pair, alignment and --order, or drop --models"
            )

    def load(plan: Plan):
        model = AutoModelForCausalLM.from_pretrained(by_blocks[plan.teacher_blocks], dtype=dtype)
        return model.to(device).eval().requires_grad_(False)

    return sizes, load
