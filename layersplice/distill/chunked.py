"""CE and KL from final hidden states and LM heads, a chunk of tokens at a time.

The full logits of a micro-batch are [tokens x vocab] in fp32 for each model:
1.24 GB at 2048 tokens and Qwen3's 151,936-token vocabulary, and the plain
loss keeps several of them (logits, log-softmaxes, the KL matrix, gradients).
Here the logits of at most `chunk` tokens exist at once. The gradients are
computed in the same pass as the losses (the softmaxes are at hand then) and
kept until backward, which only scales them: each head matmul runs once
forward and twice for its gradients, as in the materialized computation.

The terms are those of losses.py: CE of the student before temperature,
KL(teacher || student) of softmax(logits / T) summed over the vocabulary; each
weighted per token by the caller (1 / real tokens, 0 for padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Tokens per chunk when not set: about 2^24 logits (64 MiB in fp32) per
# [chunk x vocab] temporary, of which a chunk holds about six; a multiple of
# 128 tokens, which GPU matmul tiles divide evenly.
AUTO_CHUNK_LOGITS = 2**24
TILE = 128


def auto_chunk_tokens(vocab_size: int) -> int:
    return max(TILE, min(4096, AUTO_CHUNK_LOGITS // vocab_size // TILE * TILE))


@dataclass(frozen=True)
class LogitForm:
    """What a model does to lm_head(h) before it returns logits: z = scale * raw,
    then, with a soft cap c (Gemma-2), z = c * tanh(z / c)."""

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits and dz/draw where it is not the constant `scale` (else None)."""
        z = raw if self.scale == 1 else raw * self.scale
        if self.softcap is None:
            return z, None
        z = torch.tanh(z / self.softcap)
        slope = (1 - z * z) * self.scale
        return z * self.softcap, slope

    def chain(self, dz: torch.Tensor, slope: torch.Tensor | None) -> torch.Tensor:
        """Gradient with respect to the raw head output, given the one w.r.t. the logits."""
        if slope is not None:
            return dz.mul_(slope)
        return dz if self.scale == 1 else dz.mul_(self.scale)


@dataclass(frozen=True)
class Head:
    """One model's LM head as the loss sees it: weight [vocab x hidden], bias, form."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    form: LogitForm

    def logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.form.apply(F.linear(hidden, self.weight, self.bias).float())


@dataclass(frozen=True)
class LogitLosses:
    total: torch.Tensor  # ce + kl_scale * kl, differentiable
    ce: torch.Tensor
    kl: torch.Tensor


class _GradientSums:
    """fp32 accumulators for the gradients one head receives over all chunks."""

    def __init__(self, head: Head, hidden: torch.Tensor, wanted: tuple[bool, bool, bool]) -> None:
        self.wanted = wanted
        self.hidden = torch.zeros_like(hidden) if wanted[0] else None
        self.weight = torch.zeros_like(head.weight, dtype=torch.float32) if wanted[1] else None
        self.bias = (torch.zeros_like(head.bias, dtype=torch.float32)
                     if wanted[2] and head.bias is not None else None)

    def add(self, rows: slice, hidden: torch.Tensor, head: Head, raw_grad: torch.Tensor) -> None:
        if self.hidden is not None:
            self.hidden[rows] = (raw_grad.to(head.weight.dtype) @ head.weight).to(self.hidden.dtype)
        if self.weight is not None:
            if torch.is_autocast_enabled(hidden.device.type):  # a bf16 matmul, summed in fp32
                self.weight += (raw_grad.T @ hidden).float()
            else:  # in place: no [vocab x hidden] temporary
                self.weight.addmm_(raw_grad.T, hidden.to(raw_grad.dtype))
        if self.bias is not None:
            self.bias += raw_grad.sum(0)

    def result(self, head: Head, scale: torch.Tensor) -> tuple:
        """The sums times the upstream gradient, in the dtypes of the inputs."""
        return tuple(
            None if grad is None else grad.mul_(scale).to(like.dtype)
            for grad, like in ((self.hidden, self.hidden), (self.weight, head.weight), (self.bias, head.bias))
        )


class _ChunkedLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias,
                targets, ce_weights, kl_weights, kl_scale: float, temperature: float,
                s_form: LogitForm, t_form: LogitForm, chunk: int, track: bool):
        student, teacher = Head(s_weight, s_bias, s_form), Head(t_weight, t_bias, t_form)
        needs = ctx.needs_input_grad if track else (False,) * 6  # no gradients under no_grad
        s_grads = _GradientSums(student, s_hidden, needs[0:3])
        t_grads = _GradientSums(teacher, t_hidden, needs[3:6])
        ce = torch.zeros((), device=s_hidden.device)
        kl = torch.zeros((), device=s_hidden.device)
        for start in range(0, len(s_hidden), chunk):
            rows = slice(start, start + chunk)
            ce_part, kl_part = _chunk(
                s_hidden[rows], t_hidden[rows], student, teacher, targets[rows], ce_weights[rows],
                kl_weights[rows], kl_scale, temperature, rows, s_grads, t_grads,
            )
            ce += ce_part
            kl += kl_part
        ctx.student, ctx.teacher, ctx.grads = student, teacher, (s_grads, t_grads)
        ctx.mark_non_differentiable(ce, kl)
        return ce + kl_scale * kl, ce, kl

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kl):
        s_grads, t_grads = ctx.grads
        ctx.grads = None
        return (*s_grads.result(ctx.student, grad_total), *t_grads.result(ctx.teacher, grad_total),
                None, None, None, None, None, None, None, None, None)


def _chunk(s_hidden, t_hidden, student: Head, teacher: Head, targets, ce_weights, kl_weights,
           kl_scale: float, temperature: float, rows: slice,
           s_grads: _GradientSums, t_grads: _GradientSums) -> tuple[torch.Tensor, torch.Tensor]:
    """Both loss sums of one chunk; the chunk's gradients added to the accumulators."""
    s_logits, s_slope = student.logits(s_hidden)  # autograd is off inside Function.forward
    t_logits, t_slope = teacher.logits(t_hidden)
    s_log_probs = torch.log_softmax(s_logits, -1)
    picked = targets[:, None]
    ce_per_token = -s_log_probs.gather(-1, picked)[:, 0]
    if temperature != 1:
        s_log_probs_t = torch.log_softmax(s_logits.div_(temperature), -1)
        t_log_probs_t = torch.log_softmax(t_logits.div_(temperature), -1)
    else:
        s_log_probs_t, t_log_probs_t = s_log_probs, torch.log_softmax(t_logits, -1)
    del s_logits, t_logits
    t_probs = t_log_probs_t.exp()
    log_ratio = t_log_probs_t.sub_(s_log_probs_t)  # log p_t - log p_s, in place of the teacher's
    kl_per_token = torch.linalg.vecdot(t_probs, log_ratio)
    kl_factor = kl_weights * (kl_scale / temperature)

    if t_grads.wanted != (False, False, False):
        # d KL / d z_t = p_t (log p_t - log p_s - KL) / T
        t_raw_grad = (log_ratio - kl_per_token[:, None]).mul_(t_probs).mul_(kl_factor[:, None])
        t_grads.add(rows, t_hidden, teacher, teacher.form.chain(t_raw_grad, t_slope))
        del t_raw_grad
    del log_ratio
    if s_grads.wanted != (False, False, False):
        # d CE / d z_s = softmax(z_s) - onehot(target);  d KL / d z_s = (p_s - p_t) / T
        s_raw_grad = s_log_probs_t.exp().sub_(t_probs).mul_(kl_factor[:, None])
        if temperature != 1:
            s_raw_grad += s_log_probs.exp().mul_(ce_weights[:, None])
        else:
            s_raw_grad += s_log_probs_t.exp_().mul_(ce_weights[:, None])
        s_raw_grad.scatter_add_(-1, picked, -ce_weights[:, None])
        s_grads.add(rows, s_hidden, student, student.form.chain(s_raw_grad, s_slope))
    return (ce_weights * ce_per_token).sum(), (kl_weights * kl_per_token).sum()


def chunked_logit_losses(
    student: Head, s_hidden: torch.Tensor, teacher: Head, t_hidden: torch.Tensor,
    ids: torch.Tensor, mask: torch.Tensor, temperature: float, kl_scale: float, chunk: int,
) -> LogitLosses:
    """CE and KL of losses.py from [batch, seq, hidden] final states, without full logits.

    CE averages over positions whose next token is real, KL over real tokens;
    `total` = ce + kl_scale * kl carries the gradients of both.
    """
    targets = torch.roll(ids, -1, dims=1)
    predicts = torch.zeros_like(mask)
    predicts[:, :-1] = mask[:, :-1] & mask[:, 1:]
    ce_weights = predicts.flatten().float() / predicts.sum().clamp(min=1)
    kl_weights = mask.flatten().float() / mask.sum().clamp(min=1)
    total, ce, kl = _ChunkedLogitLoss.apply(
        s_hidden.flatten(0, 1), student.weight, student.bias,
        t_hidden.flatten(0, 1), teacher.weight, teacher.bias,
        targets.flatten(), ce_weights, kl_weights, kl_scale, temperature,
        student.form, teacher.form, chunk, torch.is_grad_enabled(),
    )
    return LogitLosses(total, ce, kl)
