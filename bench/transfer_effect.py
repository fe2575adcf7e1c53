"""Does `layersplice transfer` work on the fixture pair? A markdown table for bench/RESULTS.md.

1. A "post-trained" variant of fixtures/tiny-teacher (trained on stdlib
   docstrings and comments): fine-tuned briefly on Python code, the stdlib's
   source with docstrings and comments stripped (ast.unparse), leaving out
   the modules of stdlib_text.HELD_OUT_MODULES.
2. `layersplice transfer` gives the variant its student from
   fixtures/tiny-student (distilled from the base teacher), with no
   distillation; `layersplice build --all` then writes every size of the
   variant's family from it.
3. Held-out perplexity at every size, on the code of the held-out modules
   (the variant's kind of text) and on their docstrings (the base's kind):
   the base family, the transferred family, and the variant's family with
   no transfer at all (the variant's kept layers alone, init(V), patched
   with the variant's blocks: `eval --baseline naive` of the variant pair).

Deterministic (fixed seeds, one thread); about a minute on 2 cores. The
variant and the built family go to bench/.cache/transfer/ (ignored by git).

    python bench/transfer_effect.py [--steps 300] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from layersplice.distill.config import DataSpec
from layersplice.distill.data import load_data
from layersplice.evaluation.perplexity import EvalRequest, evaluate_family
from layersplice.evaluation.stdlib_text import HELD_OUT_MODULES, write_documents
from layersplice.planning.job import open_job

from fixture_script import make_tiny_pair

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
CACHE = ROOT / "bench" / ".cache" / "transfer"
SKIPPED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
FILE_CAP = 4_000  # characters of code a module: spreads the text over the whole library
TEXT_CAP = 1_000_000
SEQ_LEN = 128
SEED = 0


def code_of(path: Path) -> str:
    """A module's code without docstrings or comments (ast.unparse drops comments)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    try:
        return ast.unparse(tree)
    except (ValueError, RecursionError):
        return ""


def _held_out_files() -> set[Path]:
    import importlib.util

    paths = set()
    for name in HELD_OUT_MODULES:
        origin = Path(importlib.util.find_spec(name).origin)
        paths.add(origin.parent if origin.name == "__init__.py" else origin)
    return paths


def code_documents() -> tuple[list[str], list[str]]:
    """(training code, held-out code): the held-out modules' code, and up to FILE_CAP
    characters of every other stdlib module's, in a seeded shuffled order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    held_out = _held_out_files()
    files = sorted((p for p in root.rglob("*.py") if not SKIPPED_DIRS & set(p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    train, test, size = [], [], 0
    for path in files:
        if held_out & {path, *path.parents}:
            test.append(code_of(path))
        elif size < TEXT_CAP:
            text = code_of(path)[:FILE_CAP]
            if text:
                train.append(text)
                size += len(text)
    random.Random(SEED).shuffle(train)
    return train, [t for t in test if t]


def fine_tune(base: Path, data_file: Path, out: Path, steps: int, lr: float) -> None:
    """Plain next-token training of the base teacher on code: the "post-trained" variant."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    spec = DataSpec(files=(data_file,), seq_len=SEQ_LEN, val_tokens=SEQ_LEN, shuffle_window=4096, seed=SEED)
    data = load_data(spec, tokenizer, len(tokenizer))
    model.train()
    make_tiny_pair().train_next_token(model, data, steps, batch_size=8, lr=lr, warmup=10, label="fine-tune",
                                       report_every=100)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def layersplice(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "layersplice", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"layersplice {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of 8 x 128 tokens")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak fine-tuning learning rate")
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens to measure per text")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)
    train, test = code_documents()
    train_file, code_file = CACHE / "code-train.jsonl", CACHE / "code-held-out.jsonl"
    train_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in train))
    code_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in test))
    docs_file = write_documents(CACHE / "docstrings-held-out.jsonl", HELD_OUT_MODULES)
    base, student = FIXTURES / "tiny-teacher", FIXTURES / "tiny-student"
    variant, transferred, family = CACHE / "variant", CACHE / "transferred", CACHE / "family"
    fine_tune(base, train_file, variant, args.steps, args.lr)

    summary = json.loads(layersplice("transfer", "--base-teacher", str(base), "--teacher", str(variant),
                                     "--student", str(student), "--out", str(transferred), "--force", "--json"))
    layersplice("build", "--teacher", str(variant), "--student", str(transferred), "--all", "--out", str(family),
                "--force")
    layersplice("verify", "--against-sources", str(transferred))

    base_job = open_job(str(base), str(student), [])
    variant_job = open_job(str(variant), str(transferred), [])
    rows = {}
    for text_name, text in (("code", code_file), ("docstrings", docs_file)):
        request = EvalRequest(text, seq_len=SEQ_LEN, max_tokens=args.tokens, device="cpu")
        rows[text_name, "base"] = evaluate_family(base_job, "last", request)[0]
        with_naive = EvalRequest(text, baseline=True, seq_len=SEQ_LEN, max_tokens=args.tokens, device="cpu",
                                 models_dir=family)
        rows[text_name, "transfer"] = evaluate_family(variant_job, "last", with_naive)[0]
    _print(summary, rows, len(train), sum(map(len, train)), args, time.perf_counter() - started)


def _print(summary: dict, rows: dict, documents: int, characters: int, args, seconds: float) -> None:
    similarity = summary["delta_similarity"]
    print(f"variant: {args.steps} steps x 8 x {SEQ_LEN} tokens on {documents} modules' code "
          f"({characters:,} characters), lr {args.lr}")
    print(f"delta similarity cos(V - B, S - init(B)): total {similarity['total']:.4f}, embeddings "
          f"{similarity['embeddings']:.4f}, final norm + head {similarity['head']:.4f}, layers "
          + ", ".join(f"{row['cosine']:.3f}" for row in similarity["layers"]))
    print()
    print("| layers | role | code: base family | code: transferred | code: variant, no transfer "
          "| docstrings: base family | docstrings: transferred | docstrings: variant, no transfer |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for i, base_row in enumerate(rows["code", "base"]):
        cells = []
        for text_name in ("code", "docstrings"):
            b, t = rows[text_name, "base"][i], rows[text_name, "transfer"][i]
            cells += [f"{b.perplexity:.2f}", f"**{t.perplexity:.2f}**" if t.perplexity < b.perplexity
                      else f"{t.perplexity:.2f}", f"{t.naive_perplexity:.2f}"]
        print(f"| {base_row.layers} | {base_row.role} | " + " | ".join(cells) + " |")
    print(f"\n{seconds:.0f} s in all")


if __name__ == "__main__":
    main()
