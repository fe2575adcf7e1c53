"""Teacher and student as transformers models, checked against each other and the alignment."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from layersplice.distill.chunked import LogitForm, auto_chunk_tokens
from layersplice.distill.config import DataError, DistillConfig, DistillError, first_line
from layersplice.distill.heads import logit_form
from layersplice.distill.losses import aligned_hidden_states
from layersplice.distill.parallel import World, place, prepare_layers
from layersplice.distill.progress import notice
from layersplice.errors import AlignmentError, CheckpointError
from layersplice.planning.alignment import STUDENT_CONFIG_NAME, Alignment, read_student_config


@dataclass
class Models:
    teacher: torch.nn.Module
    student: torch.nn.Module
    alignment: Alignment
    tokenizer: object | None
    stored_dtype: torch.dtype  # the student's dtype on disk, used again for the output
    student_indices: list[int]
    teacher_indices: list[int]
    # Tokens per chunk of the logit losses, and what each model does after its
    # linear head; chunk_tokens 0 (and no forms): full logits.
    chunk_tokens: int = 0
    student_form: LogitForm | None = None
    teacher_form: LogitForm | None = None


def _check_model_dir(path: Path, flag: str) -> None:
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{flag} {path}: no config.json; give a transformers model directory or a Hugging Face repo id"
        )
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{flag} {path}: no .safetensors weights; save the model with safetensors")


def _stored_dtype(path: Path) -> torch.dtype:
    from transformers import AutoConfig

    dtype = AutoConfig.from_pretrained(path).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def _load(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=False, use_safetensors=True
    )


def _refuse_non_finite(model: torch.nn.Module, flag: str, path: Path) -> None:
    """NaN or Inf in a weight makes every loss and gradient NaN: refuse it before training starts."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{flag} {path}: tensor {name!r} holds {bad:,} NaN or infinite value(s) of {tensor.numel():,}; "
                "distilling from it would only produce NaN. Give weights with finite values"
            )


def teacher_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise DataError(
            f"--teacher {path}: its tokenizer cannot be loaded ({first_line(error)}); the data is tokenized "
            "with the teacher's tokenizer, so add its tokenizer files, or use --synthetic-data"
        ) from None


def load_models(config: DistillConfig, world: World) -> Models:
    """Teacher frozen in eval mode (bf16 on CUDA), student in fp32 for training; both placed."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    _check_model_dir(config.teacher, "--teacher")
    _check_model_dir(config.student, "--student")
    copied = read_student_config(config.student)
    if copied is None:
        raise AlignmentError(
            f"--student {config.student}: no {STUDENT_CONFIG_NAME}; make the student with "
            "`layersplice init-student`, which writes it"
        )
    tokenizer = None if config.data.synthetic else teacher_tokenizer(config.teacher)  # fails fast, before the weights
    teacher_dtype = torch.bfloat16 if world.device.type == "cuda" else torch.float32
    teacher = _load(config.teacher, teacher_dtype).eval().requires_grad_(False)
    _refuse_non_finite(teacher, "--teacher", config.teacher)
    student = _load(config.student, torch.float32).train()
    _refuse_non_finite(student, "--student", config.student)
    alignment = Alignment(copied, teacher.config.num_hidden_layers)
    _check_pair(teacher, student, alignment, config)
    pairs = aligned_hidden_states(alignment)
    forms = _logit_forms(teacher, student, config, world)  # before placing: the check runs a forward
    prepare_layers(teacher, config.compile, checkpointing=False)
    prepare_layers(student, config.compile, config.activation_checkpointing)
    chunk = config.loss_chunk_tokens
    return Models(
        teacher=place(teacher, world, shard=config.shard_teacher),
        student=place(student, world, shard=True, mixed_precision=True),
        alignment=alignment,
        tokenizer=tokenizer,
        stored_dtype=_stored_dtype(config.student),
        student_indices=[s for s, _ in pairs],
        teacher_indices=[t for _, t in pairs],
        chunk_tokens=0 if forms is None else chunk or auto_chunk_tokens(teacher.config.vocab_size),
        student_form=None if forms is None else forms[0],
        teacher_form=None if forms is None else forms[1],
    )


def _logit_forms(teacher, student, config: DistillConfig, world: World) -> tuple[LogitForm, LogitForm] | None:
    """Both models' logit transforms for the chunked loss, or None for full logits."""
    if config.loss_chunk_tokens == 0:
        return None
    forms = logit_form(student), logit_form(teacher)
    for form, model, flag in zip(forms, (student, teacher), ("--student", "--teacher"), strict=True):
        if isinstance(form, str):
            notice(f"distill: {flag} ({model.config.model_type}): {form}; CE and KL use full "
                   "[tokens x vocabulary] logits, which take more memory", world.is_main)
            return None
    return forms


def _check_pair(teacher, student, alignment: Alignment, config: DistillConfig) -> None:
    if student.config.num_hidden_layers != alignment.n_student:
        raise AlignmentError(
            f"--student {config.student}: {student.config.num_hidden_layers} layers, but "
            f"{STUDENT_CONFIG_NAME} lists {alignment.n_student} copied teacher layers; "
            "re-create the student with `layersplice init-student`"
        )
    if student.config.vocab_size != teacher.config.vocab_size:
        raise DistillError(
            f"teacher vocabulary {teacher.config.vocab_size} != student vocabulary "
            f"{student.config.vocab_size}; the student must come from this teacher"
        )
    for model, flag in ((teacher, "--teacher"), (student, "--student")):
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and config.data.seq_len > limit:
            raise DistillError(
                f"--seq-len {config.data.seq_len} is longer than {flag}'s "
                f"max_position_embeddings {limit}; lower --seq-len"
            )


def hidden_states_at(output, indices: list[int], n_layers: int) -> list[torch.Tensor]:
    """The aligned entries of an HF output's hidden_states; the others are released with it."""
    states = output.hidden_states
    if len(states) != n_layers + 1:
        raise DistillError(
            f"the model returned {len(states)} hidden states for {n_layers} layers; distill "
            "needs transformers' layout [embeddings, layer outputs..., final normed]"
        )
    return [states[i] for i in indices]
