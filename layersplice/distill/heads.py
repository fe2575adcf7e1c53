"""Which models' logits the chunked loss can compute itself, and their live heads.

A model qualifies when its logits are a linear map of its final normed hidden
state followed by a transform its config names (Gemma-2's soft cap, Cohere's
logit_scale, Granite's logits_scaling). That is checked on a few tokens at
load, against the model's own forward, rather than trusted from a list: a
family that does anything else falls back to full logits.
"""

from __future__ import annotations

import torch

from layersplice.distill.chunked import Head, LogitForm

CHECK_TOKENS = 8


def _form_from_config(config) -> LogitForm:
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitForm(scale=scale, softcap=float(softcap) if softcap else None)


def head_of(model: torch.nn.Module, form: LogitForm) -> Head:
    """The head's current weight and bias (under FSDP, the unsharded ones after forward)."""
    linear = model.get_output_embeddings()
    return Head(linear.weight, linear.bias, form)


@torch.no_grad()
def logit_form(model: torch.nn.Module) -> LogitForm | str:
    """The transform after the model's linear head, or why its logits are something else."""
    linear = model.get_output_embeddings()
    if not isinstance(linear, torch.nn.Linear):
        return f"its output layer is {type(linear).__name__}, not a linear map"
    form = _form_from_config(model.config)
    ids = torch.arange(CHECK_TOKENS, device=linear.weight.device)[None] % model.config.vocab_size
    was_training = model.training
    model.eval()
    try:  # the loop asks for the logits of one position; here of all, by the same argument
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=CHECK_TOKENS)
    except TypeError:
        return "its forward takes no logits_to_keep"
    finally:
        model.train(was_training)
    ours, _ = head_of(model, form).logits(out.hidden_states[-1])
    theirs = out.logits.float()
    tolerance = 1e-4 if linear.weight.dtype == torch.float32 else 2e-2
    scale = theirs.abs().max().clamp(min=1e-6)
    if not ((ours - theirs).abs().max() / scale <= tolerance):
        return "its logits are not a linear map of its final hidden state with a known transform"
    return form
