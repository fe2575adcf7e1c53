"""FLOPs a token against torch's own FLOP counter; TFLOP/s and MFU in the metrics."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from layersplice.distill.throughput import Speed, flops_per_token

SEQ = 16


def _counted_flops_of_one_training_sequence(student, teacher) -> int:
    """What FlopCounterMode sees: teacher forward, student forward and backward."""
    ids = torch.randint(0, student.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher(ids, use_cache=False)
        student(ids, use_cache=False).logits.sum().backward()
    return counter.get_total_flops()


def test_flops_per_token_equal_torch_flop_counter_for_gpt2():
    # GPT-2: learned positions, so every matmul is a weight or attention product.
    def model(layers: int, tied: bool):
        config = transformers.GPT2Config(vocab_size=101, n_embd=64, n_layer=layers, n_head=4, n_positions=SEQ,
                                         tie_word_embeddings=tied)
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager")

    student, teacher = model(2, tied=True), model(4, tied=False)
    assert flops_per_token(student, teacher, SEQ) * SEQ == _counted_flops_of_one_training_sequence(student, teacher)


def test_flops_per_token_equal_torch_flop_counter_for_llama_with_grouped_query_attention():
    def model(layers: int):
        config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=False)
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager")

    student, teacher = model(2), model(4)
    assert flops_per_token(student, teacher, SEQ) * SEQ == _counted_flops_of_one_training_sequence(student, teacher)


def test_speed_reports_mfu_only_with_a_peak():
    without = Speed(tokens_per_step=1000, flops_per_token=2e9, devices=2, peak_tflops=None).metrics(0.5)
    assert without == {"tokens_per_s": 2000.0, "tflops_per_device": pytest.approx(2.0)}
    with_peak = Speed(tokens_per_step=1000, flops_per_token=2e9, devices=2, peak_tflops=8.0).metrics(0.5)
    assert with_peak["mfu"] == pytest.approx(0.25)
