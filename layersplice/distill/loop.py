"""The distill run, top to bottom:

    data -> teacher forward (no grad) -> student forward -> CE, KL, cosine -> step

One process or many (torchrun): the only difference is in `parallel`, which
shards the student (and, if asked, the teacher) with FSDP2. Each optimizer
step consumes the same --batch-size blocks whatever the number of processes;
rank r takes its slice.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Iterator

import torch

from layersplice.distill import parallel
from layersplice.distill.checkpoints import begin, check_out, load_checkpoint, save_checkpoint, saved_checkpoints
from layersplice.distill.config import DistillConfig
from layersplice.distill.data import Batch, DistillData, load_data
from layersplice.distill.export import export_student
from layersplice.distill.feed import Feed, restore
from layersplice.distill.chunked import chunked_logit_losses
from layersplice.distill.heads import head_of
from layersplice.distill.losses import (
    LossTerms,
    cosine_loss,
    distill_terms,
    full_logit_losses,
    kl_scale,
    weighted_total,
)
from layersplice.distill.models import Models, hidden_states_at, load_models, teacher_tokenizer
from layersplice.distill.parallel import World
from layersplice.distill.progress import RunLog, notice
from layersplice.distill.seal import refuse_a_finished_run, seal_student
from layersplice.distill.survey import Survey, data_summary, survey_data
from layersplice.distill.throughput import Speed, describe_run, flops_per_token, known_peak_tflops

BETAS = (0.9, 0.95)
EPS = 1e-8


def build_optimizer(student: torch.nn.Module, config: DistillConfig) -> torch.optim.AdamW:
    """AdamW; like HF Trainer, no weight decay on biases and norm weights (1-d tensors)."""
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # One fused kernel for all parameters on CUDA; the default (foreach) elsewhere.
    fused = True if next(student.parameters()).device.type == "cuda" else None
    return torch.optim.AdamW(groups, lr=config.lr, betas=BETAS, eps=EPS, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, config: DistillConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over --warmup of the steps (at least one), then cosine decay to zero."""
    warmup = max(1, round(config.warmup * config.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def forward_and_loss(models: Models, batch: Batch, config: DistillConfig, world: World) -> LossTerms:
    """Teacher (no grad) then student on one micro-batch; the three loss terms."""
    attention_mask = batch.mask.long() if batch.padded else None
    chunked = models.chunk_tokens > 0
    # The chunked loss reads the final hidden states and the heads: the models
    # need compute the logits of one position only.
    forward = dict(attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    if chunked:
        forward["logits_to_keep"] = 1
    with world.autocast():
        with torch.no_grad():
            teacher_out = models.teacher(input_ids=batch.ids, **forward)
            teacher_logits = None if chunked else teacher_out.logits
            teacher_states = hidden_states_at(teacher_out, models.teacher_indices, models.alignment.n_teacher)
            del teacher_out
        student_out = models.student(input_ids=batch.ids, **forward)
        student_states = hidden_states_at(student_out, models.student_indices, models.alignment.n_student)
        cos = cosine_loss(student_states, teacher_states, batch.mask)
        if chunked:  # the last aligned pair is the final normed states, which the heads read
            logit = chunked_logit_losses(
                head_of(models.student, models.student_form), student_states[-1],
                head_of(models.teacher, models.teacher_form), teacher_states[-1],
                batch.ids, batch.mask, config.loss.temperature, kl_scale(config.loss), models.chunk_tokens,
            )
        else:
            logit = full_logit_losses(student_out.logits, teacher_logits, batch.ids, batch.mask, config.loss)
        return distill_terms(logit, cos, config.loss)


def train_step(models: Models, micro_batches: list[Batch], optimizer, scheduler,
               config: DistillConfig, world: World) -> dict:
    """One optimizer step over this rank's micro-batches; the terms averaged over the global batch."""
    sums = torch.zeros(4, device=world.device)
    for batch in micro_batches:
        terms = forward_and_loss(models, batch, config, world)
        (terms.total / len(micro_batches)).backward()
        sums += torch.stack([terms.total.detach(), terms.ce, terms.kl, terms.cos])
    grad_norm = parallel.clip_gradients(models.student, config.grad_clip)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    means = parallel.mean_over_ranks(sums / len(micro_batches), world).tolist()
    return dict(zip(("loss", "ce", "kl", "cos"), means)) | {"lr": lr, "grad_norm": grad_norm}


@torch.no_grad()
def evaluate(models: Models, data: DistillData, config: DistillConfig, world: World) -> dict:
    """Token-weighted loss terms on the held-out blocks, shared out across ranks."""
    per_rank = math.ceil(len(data.val.ids) / world.size)
    # Every rank runs as many forwards as the others (FSDP gathers in lockstep):
    # the rows added to even out the shares are masked out and weigh nothing.
    missing = per_rank * world.size - len(data.val.ids)
    ids = torch.cat([data.val.ids, data.val.ids[:1].expand(missing, -1)])
    mask = torch.cat([data.val.mask, torch.zeros_like(data.val.mask[:1]).expand(missing, -1)])
    mine = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
    sums = torch.zeros(5, device=world.device, dtype=torch.float64)
    models.student.eval()
    for batch_ids, batch_mask in zip(ids[mine].split(config.micro_batch_size),
                                     mask[mine].split(config.micro_batch_size)):
        batch = Batch(batch_ids, batch_mask, padded=True).to(world.device)
        terms = forward_and_loss(models, batch, config, world)
        tokens = batch.mask.sum()
        predicted = (batch.mask[:, :-1] & batch.mask[:, 1:]).sum()
        sums += torch.stack([terms.ce * predicted, terms.kl * tokens, terms.cos * tokens,
                             predicted, tokens]).double()
    models.student.train()
    ce, kl, cos, predicted, tokens = parallel.sum_over_ranks(sums, world).tolist()
    ce, kl, cos = ce / max(predicted, 1), kl / max(tokens, 1), cos / max(tokens, 1)
    return {"val_loss": weighted_total(ce, kl, cos, config.loss), "val_ce": ce, "val_kl": kl, "val_cos": cos}


def distill(config: DistillConfig) -> dict | None:
    """Run the whole distillation and write the student to config.out, sealed.

    Returns what was written (for --json) on rank 0, None on the other ranks."""
    world = parallel.start_world(config.device)
    try:
        with _left_as_found_if_failed_early(config, world):
            return _run(config, world)
    finally:
        parallel.stop_world(world)


def _run(config: DistillConfig, world: World) -> dict | None:
    config.accumulation_steps(world.size)  # refuses a global batch the processes cannot share
    parallel.decided_on_main(lambda: refuse_a_finished_run(config), world)
    parallel.decided_on_main(lambda: check_out(config), world)
    survey = parallel.decided_on_main(lambda: _survey(config), world)  # every document, before any model
    checkpoints = begin(config, world)  # identifies teacher and student; on --resume, verifies the checkpoint
    torch.manual_seed(config.data.seed + world.rank)
    models = load_models(config, world)
    data = load_data(config.data, models.tokenizer, models.teacher.config.vocab_size, world.rank, world.size)
    notice(data_summary(survey, data, config), world.is_main)
    optimizer = build_optimizer(models.student, config)
    scheduler = build_scheduler(optimizer, config)
    step = 0
    if config.resume:
        restored = load_checkpoint(config, models.student, optimizer, scheduler, world, checkpoints)
        step = restored["step"]
        restore(data.train, restored["data"], world)
    evaluating = len(data.val.ids) > 0 and config.eval_every > 0
    speed = _speed(models, config, world)
    feed = Feed(data.train, config.batch_size, config.micro_batch_size, world, steps=config.steps - step)
    with RunLog(config.out, config.steps, step, enabled=world.is_main) as log, contextlib.closing(feed):
        if evaluating and step == 0:
            log.record({"step": 0} | evaluate(models, data, config, world))
        while step < config.steps:
            started = time.perf_counter()
            micro_batches, waited = feed.next()
            metrics = train_step(models, micro_batches, optimizer, scheduler, config, world)
            step += 1
            elapsed = time.perf_counter() - started
            metrics |= speed.metrics(elapsed) | {"step_s": elapsed, "data_wait_s": waited}
            if world.device.type == "cuda":
                metrics["cuda_max_memory_gib"] = torch.cuda.max_memory_allocated(world.device) / 2**30
            log.record({"step": step} | metrics)
            if evaluating and (step % config.eval_every == 0 or step == config.steps):
                log.record({"step": step} | evaluate(models, data, config, world))
            if config.save_every and step % config.save_every == 0:
                save_checkpoint(config, step, models.student, optimizer, scheduler, feed.state_dict(), world,
                                checkpoints)
            checkpoints.settle(world)  # publishes an asynchronous save once it is written
    checkpoints.settle(world, wait=True)
    export_student(config, models.student, models.stored_dtype, world)
    if not world.is_main:
        return None
    written = seal_student(config, models.alignment)
    notice(f"wrote {config.out}: the distilled student, sealed; `layersplice verify {config.out}` checks it",
           enabled=True)
    return written


def _survey(config: DistillConfig) -> Survey:
    tokenizer = None if config.data.synthetic else teacher_tokenizer(config.teacher)
    return survey_data(config.data, config.teacher, tokenizer, processes=len(os.sched_getaffinity(0)))


@contextlib.contextmanager
def _left_as_found_if_failed_early(config: DistillConfig, world: World) -> Iterator[None]:
    """A new run that stops before its first checkpoint leaves --out as it found it:
    absent, or empty. (check_out refuses a new run in a folder that holds
    anything, so nothing of the user's is ever removed.) Once a checkpoint
    exists, everything stays, for --resume."""
    absent = not config.out.exists()
    empty = config.out.is_dir() and not any(config.out.iterdir())
    try:
        yield
    except BaseException:
        if world.is_main and not config.resume and (absent or empty) and not saved_checkpoints(config.out):
            if absent:
                shutil.rmtree(config.out, ignore_errors=True)
            else:
                for entry in config.out.iterdir():
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
        raise


def _speed(models: Models, config: DistillConfig, world: World) -> Speed:
    """How a step's time becomes TFLOP/s and MFU; says at start what the run is."""
    seq_len = config.data.seq_len
    speed = Speed(
        tokens_per_step=config.batch_size * seq_len,
        flops_per_token=flops_per_token(models.student, models.teacher, seq_len),
        devices=world.size,
        peak_tflops=config.peak_tflops or known_peak_tflops(world.device),
    )
    notice(describe_run(models.student, models.teacher, tokens_per_step=speed.tokens_per_step,
                        micro_tokens=config.micro_batch_size * seq_len, chunk_tokens=models.chunk_tokens,
                        devices=world.size, speed=speed,
                        placement=(parallel.is_sharded(models.student), parallel.is_sharded(models.teacher))),
           world.is_main)
    return speed
