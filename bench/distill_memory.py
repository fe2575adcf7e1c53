"""Peak memory and CPU throughput of `layersplice distill` at a real vocabulary,
full logits against chunked logit losses, beside a plain hand-written loop.

The pair: a Llama-shaped teacher with Qwen3's vocabulary (151,936), hidden 256,
6 layers, untied head (82M parameters), and its 1/2/2 student from
`init-student`; seq 2048, micro-batch 1, random tokens (--synthetic-data), CPU.
Three runs, each in its own process, so that each peak RSS is its own:

  * full:    `layersplice distill --loss-chunk-tokens 0` (the full-logit path);
  * chunked: `layersplice distill` as shipped (chunked CE and KL);
  * hand:    a minimal loop with the same math and materialized logits.

    python bench/distill_memory.py [--steps 3] [--threads 1] [--clock cpu|wall]

The full-logit run takes about 11 GiB. Peak RSS is each process's own maximum
resident set (getrusage), loading included. tokens/s is the median over the
steps after the first (warm-up); the default clock is the process's CPU time on
one thread, which counts the work done whatever the neighbours' load.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from hand_loop import plain_loss

SEQ_LEN, VOCAB, HIDDEN, LAYERS = 2048, 151_936, 256, 6
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def make_pair(root: Path) -> tuple[Path, Path]:
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, LlamaConfig

    from layersplice.cli.main import cli

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HIDDEN // 64, num_key_value_heads=HIDDEN // 64, max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False, eos_token_id=0, bos_token_id=None,
    )
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config)
    print(f"teacher: {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M parameters", flush=True)
    teacher.save_pretrained(root / "teacher")
    del teacher
    result = CliRunner().invoke(cli, ["init-student", "--teacher", str(root / "teacher"),
                                      "--out", str(root / "student")])
    assert result.exit_code == 0, result.output
    return root / "teacher", root / "student"


def ours(root: Path, out: Path, chunk: int | None, args, clock) -> list[float]:
    from layersplice.distill import loop
    from layersplice.distill.config import DataSpec, DistillConfig

    loop.time = types.SimpleNamespace(perf_counter=clock)  # the loop times its steps with this clock
    data = DataSpec(synthetic=True, seq_len=SEQ_LEN, val_tokens=0)
    loop.distill(DistillConfig(
        teacher=root / "teacher", student=root / "student", out=out, data=data, steps=args.steps,
        batch_size=1, micro_batch_size=1, save_every=0, eval_every=0, device="cpu", loss_chunk_tokens=chunk,
    ))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in records]


def hand_written(root: Path, args, clock) -> list[float]:
    """CE + 0.1 KL + 2 cosine with full logits, AdamW, clipping: what one would write by hand."""
    from transformers import AutoModelForCausalLM

    from layersplice.planning.alignment import Alignment, read_student_config

    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher").eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(root / "student").train()
    alignment = Alignment(read_student_config(root / "student"), teacher.config.num_hidden_layers)
    pairs = alignment.hidden_state_pairs() + ((alignment.n_student, alignment.n_teacher),)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(args.steps):
        started = clock()
        ids = torch.randint(VOCAB, (1, SEQ_LEN), generator=generator)
        ce, total = plain_loss(teacher, student, ids, pairs)
        total.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(ce.detach())
        rates.append(SEQ_LEN / (clock() - started))
    return rates


def measure(role: str, root: Path, args) -> None:
    """Run one role in this process; print its rates and peak RSS as one JSON line."""
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    if role == "hand":
        rates = hand_written(root, args, clock)
    else:
        chunk = 0 if role == "full" else None
        rates = ours(root, Path(tempfile.mkdtemp(dir=root, prefix=role)), chunk, args, clock)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"role": role, "rates": rates, "peak_rss_gib": peak_kib / 2**20}))


def run_role(role: str, root: Path, args) -> dict:
    command = [sys.executable, __file__, "--role", role, "--root", str(root), "--steps", str(args.steps),
               "--threads", str(args.threads), "--clock", args.clock]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{role} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["median"] = statistics.median(result["rates"][1:] or result["rates"])
    print(f"  {role:<8} peak RSS {result['peak_rss_gib']:5.2f} GiB   {result['median']:6.1f} tokens/s "
          f"(steps: {', '.join(f'{r:.1f}' for r in result['rates'])})", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--role", choices=["full", "chunked", "hand"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        measure(args.role, args.root, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_pair(root)
        print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, seq {SEQ_LEN}, "
              f"micro-batch 1, vocab {VOCAB:,}, {args.steps} steps each", flush=True)
        results = {role: run_role(role, root, args) for role in ("chunked", "hand", "full")}
    chunked, hand, full = results["chunked"], results["hand"], results["full"]
    print(f"chunked peak RSS {chunked['peak_rss_gib']:.2f} GiB (target <= 3.0), "
          f"{chunked['peak_rss_gib'] / full['peak_rss_gib']:.2f}x the full-logit path's")
    print(f"chunked tokens/s / hand-written loop: {chunked['median'] / hand['median']:.3f} (target >= 0.9); "
          f"full-logit path / hand-written loop: {full['median'] / hand['median']:.3f}")


if __name__ == "__main__":
    main()
