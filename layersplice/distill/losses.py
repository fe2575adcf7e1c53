"""The distillation loss of METHOD.md §3, one named function a term:

    loss = CE + w_kl * T^2 * KL(softmax(t/T) || softmax(s/T))
              + (w_cos / |A|) * sum over (a, b) in A of mean(1 - cos(h_s[a], h_t[b]))

Every term is an average over real tokens (mask == True), computed in fp32.
CE and KL come either from full logits (`full_logit_losses`, any model) or,
without them, from the final hidden states and the heads (chunked.py); both
give a `LogitLosses`, which `distill_terms` joins with the cosine term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layersplice.distill.chunked import LogitLosses
from layersplice.planning.alignment import Alignment


@dataclass(frozen=True)
class LossWeights:
    kl: float = 0.1
    temperature: float = 1.0
    cos: float = 2.0


@dataclass(frozen=True)
class LossTerms:
    """The total that is minimized and the unweighted terms it is made of."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    cos: torch.Tensor


def aligned_hidden_states(alignment: Alignment) -> tuple[tuple[int, int], ...]:
    """A: (student, teacher) indices into HF `hidden_states`, final normed states last.

    In transformers' decoder models `hidden_states` holds the embedding output,
    the outputs of layers 0..n-2 and, as entry n, the final-normed output of the
    last layer (checked for Llama, Qwen2/3, Mistral, Gemma2, Phi3, GPT-NeoX, GPT-2
    in tests/test_distill_losses.py). So (n_student, n_teacher) pairs the final
    normed states, and no pair can reach the last layer's pre-norm output.
    """
    return alignment.hidden_state_pairs() + ((alignment.n_student, alignment.n_teacher),)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is True; 0 when nothing is masked in."""
    return torch.where(mask, values, 0).sum() / mask.sum().clamp(min=1)


def cross_entropy_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the student, over positions whose target is real."""
    predicted = logits[:, :-1].float()
    per_token = F.cross_entropy(predicted.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return masked_mean(per_token, (mask[:, :-1] & mask[:, 1:]).flatten())


def _softened(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # At T = 1 (the default) skip a pass over a batch x sequence x vocabulary tensor.
    logits = logits.float()
    return logits if temperature == 1 else logits / temperature


def kl_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, summed over the vocabulary
    and averaged over real tokens ("batchmean" per token, padding left out)."""
    student_log_probs = F.log_softmax(_softened(student_logits, temperature), dim=-1)
    teacher_log_probs = F.log_softmax(_softened(teacher_logits, temperature), dim=-1)
    per_token = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    return masked_mean(per_token.sum(-1), mask)


def cosine_loss(
    student_states: list[torch.Tensor], teacher_states: list[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """(1/|A|) * sum over aligned pairs of the mean over real tokens of 1 - cos, in fp32."""
    distances = [
        masked_mean(1 - F.cosine_similarity(s.float(), t.float(), dim=-1), mask)
        for s, t in zip(student_states, teacher_states, strict=True)
    ]
    return torch.stack(distances).mean()


def full_logit_losses(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
    weights: LossWeights,
) -> LogitLosses:
    """CE and KL from materialized [batch, seq, vocab] logits."""
    ce = cross_entropy_loss(student_logits, ids, mask)
    kl = kl_loss(student_logits, teacher_logits, mask, weights.temperature)
    return LogitLosses(ce + kl_scale(weights) * kl, ce.detach(), kl.detach())


def distill_terms(logit: LogitLosses, cos: torch.Tensor, weights: LossWeights) -> LossTerms:
    return LossTerms(logit.total + weights.cos * cos, logit.ce, logit.kl, cos.detach())


def kl_scale(weights: LossWeights) -> float:
    """The KL term's weight in the total: w_kl * T^2."""
    return weights.kl * weights.temperature**2


def weighted_total(ce, kl, cos, weights: LossWeights):
    """CE + w_kl * T^2 * KL + w_cos * cos (cos already averaged over the aligned pairs)."""
    return ce + kl_scale(weights) * kl + weights.cos * cos
