"""Where a 2-process CPU distill run waits on its data: raw text against a `layersplice tokenize` output.

    python bench/distill_data.py [--steps 12] [--seq-len 256] [--batch-size 8] [--hidden 256]

A random Llama-shaped teacher (8 layers) carrying the fixture's tokenizer (3,072 ids) and its 1/2/2
student; standard-library docstrings as JSON lines, tokenized once with `layersplice tokenize`. Then
`torchrun --nproc_per_node 2 -m layersplice.distill.command` (gloo, one thread a process) runs the same
settings on the raw text and on the tokenize output. For each it prints:

  * data wait: the fraction of step time the loop spent waiting for its batch (data_wait_s / step_s,
    summed over the steps of metrics.jsonl; also without the first step, which waits for the first
    batch and, on raw text, for the first --shuffle-window blocks to be tokenized);
  * supply: the tokens a second one process's data path hands over (its share of each global batch,
    drawn in a loop with no training: tokenizing and packing for raw text, memory-map reads for
    tokenized data), against the tokens a second its steps consume (its share / median step).

Targets with tokenized data: wait <= 1 % of step time; supply >= 10x consumption. Wall clock throughout
(waiting is wall time); on a shared machine compare the two runs of one invocation only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from layersplice.cli.main import cli
from layersplice.distill.config import DataSpec
from layersplice.distill.data import load_data
from layersplice.evaluation.stdlib_text import module_docstrings

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "fixtures" / "tiny-teacher"
MODULES = 150  # standard-library modules whose docstrings make the text (in name order)


def make_pair(root: Path, hidden: int, seq_len: int) -> tuple[Path, Path]:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=8,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=seq_len,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    result = CliRunner().invoke(cli, ["init-student", "--teacher", str(root / "teacher"), "--out", str(root / "student")])
    assert result.exit_code == 0, result.output
    return root / "teacher", root / "student"


def write_text(path: Path) -> Path:
    names = sorted(name for name in sys.stdlib_module_names if not name.startswith("_"))
    documents = []
    for name in names:
        spec = importlib.util.find_spec(name) if name not in ("antigravity", "this") else None
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            text = module_docstrings(name)
            if text:
                documents.append(text)
        if len(documents) == MODULES:
            break
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    return path


def distill(teacher: Path, student: Path, data: Path, out: Path, args) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "layersplice.distill.command", "--teacher", str(teacher), "--student", str(student),
               "--data", str(data), "--out", str(out), "--seq-len", str(args.seq_len), "--batch-size",
               str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size), "--steps", str(args.steps),
               "--eval-every", "0", "--save-every", "0", "--device", "cpu", *args.raw_options(data)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"distill failed:\n{done.stderr[-3000:]}")
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step_s" in r]


def supply(spec: DataSpec, tokenizer, args) -> float:
    """Tokens a second that process 0 of 2 gets from its data path, after its first batch."""
    train = load_data(spec, tokenizer, len(tokenizer), rank=0, processes=2).train
    train.next_share(args.batch_size, 0, 2)  # the first window or epoch order, as the run's first step
    batches = args.supply_batches
    started = time.perf_counter()
    for _ in range(batches):
        train.next_share(args.batch_size, 0, 2)
    return batches * args.batch_size // 2 * args.seq_len / (time.perf_counter() - started)


def report(name: str, records: list[dict], supplied: float, args) -> tuple[float, float]:
    wait = sum(r["data_wait_s"] for r in records) / sum(r["step_s"] for r in records)
    later = records[1:]
    wait_later = sum(r["data_wait_s"] for r in later) / sum(r["step_s"] for r in later)
    step = statistics.median(r["step_s"] for r in records)
    consumed = args.batch_size // 2 * args.seq_len / step
    print(f"{name:<10} {wait:>9.2%} {wait_later:>13.2%} {step:>10.3f} s {supplied:>14,.0f} {consumed:>12,.0f} "
          f"{supplied / consumed:>9.1f}x")
    return wait, supplied / consumed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--shuffle-window", type=int, default=1024, help="For the raw-text run (distill's default).")
    parser.add_argument("--supply-batches", type=int, default=200)
    args = parser.parse_args()
    args.raw_options = lambda data: [] if (data / "layersplice.json").is_file() else [
        "--val-tokens", "4096", "--shuffle-window", str(args.shuffle_window)]
    root = Path(tempfile.mkdtemp(prefix="layersplice-distill-data."))
    try:
        teacher, student = make_pair(root, args.hidden, args.seq_len)
        text = write_text(root / "text.jsonl")
        tokens = root / "tokens"
        result = CliRunner().invoke(cli, ["tokenize", "--teacher", str(teacher), "--data", str(text), "--out",
                                          str(tokens), "--seq-len", str(args.seq_len), "--val-tokens", "4096"])
        assert result.exit_code == 0, result.output
        record = json.loads((tokens / "layersplice.json").read_text())
        print(f"torch {torch.__version__}, 2 processes (gloo, 1 thread each), hidden {args.hidden}, 8-layer teacher, "
              f"seq {args.seq_len}, global batch {args.batch_size}, micro-batch {args.micro_batch_size}, "
              f"{args.steps} steps; text: {record['documents']} documents, {record['tokens']:,} tokens, "
              f"{record['train']['blocks']:,} blocks")
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        raw_spec = DataSpec(files=(text,), seq_len=args.seq_len, val_tokens=4096, shuffle_window=args.shuffle_window)
        runs = {
            "raw text": (text, supply(raw_spec, tokenizer, args)),
            "tokenized": (tokens, supply(DataSpec(files=(tokens,), seq_len=args.seq_len), tokenizer, args)),
        }
        print(f"{'data':<10} {'data wait':>9} {'after step 1':>13} {'step':>12} {'supply tok/s':>14} "
              f"{'consumed':>12} {'ratio':>10}")
        results = {name: report(name, distill(teacher, student, data, root / name.replace(" ", "-"), args),
                                supplied, args)
                   for name, (data, supplied) in runs.items()}
        wait, ratio = results["tokenized"]
        print(f"tokenized: data wait {wait:.2%} of step time (target <= 1%), supply {ratio:.1f}x consumption "
              f"(target >= 10x)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
