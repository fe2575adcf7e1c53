"""The plain distillation step the distill benches compare layersplice with:
materialized logits, the same three terms and weights (reference defaults),
written the obvious way."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def plain_loss(teacher, student, ids: torch.Tensor, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE, CE + 0.1 * KL + 2.0 * mean cosine distance) for one micro-batch with no padding."""
    with torch.no_grad():
        t = teacher(ids, output_hidden_states=True, use_cache=False)
    s = student(ids, output_hidden_states=True, use_cache=False)
    ce = F.cross_entropy(s.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    kl = F.kl_div(F.log_softmax(s.logits, -1), F.log_softmax(t.logits, -1),
                  reduction="none", log_target=True).sum(-1).mean()
    cos = torch.stack([(1 - F.cosine_similarity(s.hidden_states[a], t.hidden_states[b], dim=-1)).mean()
                       for a, b in pairs]).mean()
    return ce, ce + 0.1 * kl + 2.0 * cos
