"""How fast a run goes and what it needs: FLOPs a token from the configs,
achieved TFLOP/s and MFU, and the memory a device is expected to hold.

FLOPs follow the usual convention (PaLM, torchtitan): a matmul with N weights
costs 2N a token forward and 4N backward, so the trained student costs 6N_s
and the frozen teacher 2N_t; attention adds 12 (student) or 4 (teacher) x
layers x attention width x sequence length, counted as if not causal. N is
every weight of a matmul: embedding lookups are not counted, a tied LM head is.
Activation checkpointing's recomputation is not counted either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched
# against torch.cuda.get_device_name in this order.
PEAK_BF16_TFLOPS = (
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights that take part in a matmul for every token (2-d, not an embedding table)."""
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    count = sum(p.numel() for p in model.parameters() if p.ndim >= 2 and id(p) not in lookups)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in lookups:  # tied: the table is also the head
        count += head.weight.numel()
    return count


def attention_width(config) -> int:
    """Heads x head size: the width of the query-key and attention-value products."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def flops_per_token(student: torch.nn.Module, teacher: torch.nn.Module, seq_len: int) -> float:
    """One training token: student forward and backward, teacher forward."""
    s, t = student.config, teacher.config
    dense = 6 * matmul_parameters(student) + 2 * matmul_parameters(teacher)
    attention = (12 * s.num_hidden_layers * attention_width(s) + 4 * t.num_hidden_layers * attention_width(t))
    return float(dense + attention * seq_len)


def known_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


@dataclass(frozen=True)
class Speed:
    """Turns a step's duration into tokens/s, TFLOP/s and MFU (each per device but tokens/s)."""

    tokens_per_step: int
    flops_per_token: float
    devices: int
    peak_tflops: float | None

    def metrics(self, seconds: float) -> dict:
        tokens_per_s = self.tokens_per_step / seconds
        tflops = tokens_per_s * self.flops_per_token / self.devices / 1e12
        values = {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops}
        if self.peak_tflops:
            values["mfu"] = tflops / self.peak_tflops
        return values


def expected_bytes_per_device(student: torch.nn.Module, teacher: torch.nn.Module, *, devices: int,
                              shard_teacher: bool, logit_elements: int) -> int:
    """Weights, gradients and AdamW state of the student (fp32, sharded over the devices),
    the teacher's weights (replicated unless sharded) and the fp32 logit temporaries.
    Activations are not included."""
    student_bytes = 16 * sum(p.numel() for p in student.parameters()) // devices
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    if shard_teacher:
        teacher_bytes //= devices
    return student_bytes + teacher_bytes + 4 * logit_elements


def describe_run(student: torch.nn.Module, teacher: torch.nn.Module, *, tokens_per_step: int,
                 micro_tokens: int, chunk_tokens: int, devices: int, placement: tuple[bool, bool],
                 speed: Speed) -> str:
    """The line a run prints at start: sizes, tokens a step, FLOPs and expected memory."""
    vocab, hidden = teacher.config.vocab_size, teacher.config.hidden_size
    if chunk_tokens:  # about six [chunk x vocab] temporaries and one head-gradient sum
        logit_elements = 6 * min(chunk_tokens, micro_tokens) * vocab + vocab * hidden
    else:  # both models' logits, three log-softmaxes, the KL matrix and gradients
        logit_elements = 7 * micro_tokens * vocab
    student_sharded, teacher_sharded = placement
    expected = expected_bytes_per_device(student, teacher, devices=devices, shard_teacher=teacher_sharded,
                                         logit_elements=logit_elements)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    peak = f"peak {speed.peak_tflops:g} TFLOP/s a device" if speed.peak_tflops else "no known peak (no MFU)"
    how = {True: f"sharded over {devices} processes", False: "whole on each device"}
    return (
        f"distill: student {n_student / 1e6:,.1f}M parameters (trained, {how[student_sharded]}), teacher "
        f"{n_teacher / 1e6:,.1f}M (frozen, {how[teacher_sharded]}); {tokens_per_step:,} tokens a step; {speed.flops_per_token / 1e9:.3g} GFLOP a token; "
        f"{peak}; expects about {expected / 2**30:.3g} GiB a device ({devices} device(s)) for weights, "
        "gradients, optimizer state and logit temporaries, plus activations"
    )
