"""CPU throughput of `layersplice distill` against a minimal hand-written loop.

Both train the same random Llama-shaped student from the same teacher on the
same random-token batches, with the same math (CE + KL + cosine on the aligned
hidden states, AdamW, clipping, micro-batch accumulation). The hand loop is
what one would write with no data pipeline, logging, checkpoints or
distribution; the ratio is what the project's loop costs on top of it.

    python bench/distill_cpu.py [--steps 8] [--hidden 256] [--clock cpu|wall] [--threads 1]

Prints the median tokens/s of each (first steps dropped as warm-up) and the
ratio. On a shared machine wall time swings several-fold with the neighbours'
load; the default clock is therefore this process's CPU time on one thread,
which counts the work each loop does. Both loops time the same span: from
drawing a batch to the end of the optimizer step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaConfig

from layersplice.cli.main import cli
from layersplice.distill import loop
from layersplice.distill.config import DataSpec, DistillConfig
from layersplice.planning.alignment import Alignment, read_student_config

from hand_loop import plain_loss

WARMUP_STEPS = 2


def make_models(root: Path, hidden: int, layers: int, vocab: int, seq_len: int) -> tuple[Path, Path]:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=seq_len,
        tie_word_embeddings=True, eos_token_id=0, bos_token_id=None,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "teacher")
    result = CliRunner().invoke(cli, ["init-student", "--teacher", str(root / "teacher"), "--out", str(root / "student")])
    assert result.exit_code == 0, result.output
    return root / "teacher", root / "student"


def ours(teacher: Path, student: Path, out: Path, args) -> list[float]:
    data = DataSpec(synthetic=True, seq_len=args.seq_len, val_tokens=0)
    loop.distill(DistillConfig(
        teacher=teacher, student=student, out=out, data=data, steps=args.steps, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, save_every=0, eval_every=0, device="cpu",
    ))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in records][WARMUP_STEPS:]


def hand_written(teacher_dir: Path, student_dir: Path, args, clock) -> list[float]:
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(student_dir).train()
    alignment = Alignment(read_student_config(student_dir), teacher.config.num_hidden_layers)
    pairs = alignment.hidden_state_pairs() + ((alignment.n_student, alignment.n_teacher),)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    accumulation = args.batch_size // args.micro_batch_size
    generator = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(args.steps):
        started = clock()
        for _ in range(accumulation):
            ids = torch.randint(teacher.config.vocab_size, (args.micro_batch_size, args.seq_len), generator=generator)
            ce, total = plain_loss(teacher, student, ids, pairs)
            (total / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(ce.detach())
        rates.append(args.batch_size * args.seq_len / (clock() - started))
    return rates[WARMUP_STEPS:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="Alternate the two loops this many times.")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    # The loop times its steps with time.perf_counter; give it the same clock.
    loop.time = types.SimpleNamespace(perf_counter=clock)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, student = make_models(root, args.hidden, args.layers, args.vocab, args.seq_len)
        ours_rates, hand_rates = [], []
        for round_ in range(args.rounds):
            ours_rates += ours(teacher, student, root / f"out{round_}", args)
            hand_rates += hand_written(teacher, student, args, clock)
    ours_median, hand_median = statistics.median(ours_rates), statistics.median(hand_rates)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, hidden {args.hidden}, "
          f"{args.layers}-layer teacher, seq {args.seq_len}, batch {args.batch_size}x{args.micro_batch_size}")
    print(f"layersplice distill: {ours_median:,.0f} tokens/s (median of {len(ours_rates)} steps)")
    print(f"hand-written loop:   {hand_median:,.0f} tokens/s (median of {len(hand_rates)} steps)")
    print(f"ratio: {ours_median / hand_median:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
