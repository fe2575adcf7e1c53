"""`layersplice demo`: choose the patch order by KL, plan, build every size,
evaluate against the naive baseline and plot, on the tiny fixture pair that
ships with the repository. Its texts are stdlib docstrings (stdlib_text), so it
needs no network."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from layersplice import __version__, display
from layersplice.build import build_all
from layersplice.cli import Sources, resolve_sources
from layersplice.errors import LayerspliceError
from layersplice.eval_report import interpolation_summary, size_row
from layersplice.stdlib_text import CALIBRATION_MODULES, HELD_OUT_MODULES, write_documents
from layersplice.verify import MANIFEST_FILE

REPOSITORY = Path(__file__).resolve().parent.parent
RECIPE = REPOSITORY / "recipes" / "tiny.yaml"
SEQ_LEN = 128
MAX_TOKENS = 16384
CALIBRATION_TOKENS = 4096


def run_demo(out: Path, console: Console) -> dict:
    """Everything the demo does; returns the summary it prints."""
    import torch

    from layersplice.eval_commands import perplexity_run
    from layersplice.evaluate import EvalRequest

    if not RECIPE.exists():
        raise LayerspliceError(f"{RECIPE} is missing: the demo runs from a clone of the layersplice repository")
    # The fixture models are so small that a second thread only adds overhead.
    torch.set_num_threads(1)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    sources = resolve_sources(
        recipe_path=RECIPE, teacher=None, student=None, teacher_revision=None, student_revision=None,
        copied_teacher_layers=None, first=None, every=None, last=None, order=None, dtype=None, arch_file=None,
    )
    sources = with_kl_order(sources, write_documents(out / "calibration.jsonl", CALIBRATION_MODULES), console)
    job, name = sources.job, sources.recipe.name
    display.plan_table(console, job, sources.order, display.plan_rows(job, sources.order))
    sizes_dir = out / "sizes"
    built = build_all(job, sources.order, sizes_dir, name, sources.shard_size, force=True,
                      order_record=sources.order_record)
    display.built_table(console, built, sizes_dir)
    held_out = write_documents(out / "held-out.jsonl", HELD_OUT_MODULES)
    request = EvalRequest(held_out, baseline=True, models_dir=sizes_dir, seq_len=SEQ_LEN, max_tokens=MAX_TOKENS, device="cpu")
    meta = {"layersplice_version": __version__, "name": name, "sources": job.describe_sources(), "order": sources.order_record}
    results, paths = perplexity_run(sources, request, meta, out, console)
    seconds = time.perf_counter() - started
    console.print(
        f"demo done in {seconds:.0f} s. In {out}: sizes/ ({len(built)} checkpoints and {MANIFEST_FILE}), "
        f"{', '.join(p.name for p in paths.values())}, and the texts calibration.jsonl and held-out.jsonl",
        highlight=False,
    )
    return {
        "out": str(out),
        "sizes_dir": str(sizes_dir),
        "checkpoints": [str(b.directory) for b in built],
        "files": {kind: str(path) for kind, path in paths.items()},
        "held_out": str(held_out),
        "order": sources.order_record,
        "sizes": [size_row(r) for r in results],
        "summary": interpolation_summary(results),
        "seconds": round(seconds, 1),
    }


def with_kl_order(sources: Sources, calibration: Path, console: Console) -> Sources:
    """The sources with the patch order --order kl picks on a few thousand calibration tokens."""
    import torch

    from layersplice.evaluate import load_text, load_tokenizer
    from layersplice.in_memory import LoadedPair
    from layersplice.kl_order import choose_kl_order

    job = sources.job
    text = load_text(calibration, load_tokenizer(job.teacher.directory), SEQ_LEN, CALIBRATION_TOKENS)
    chosen = choose_kl_order(LoadedPair(job, torch.device("cpu"), torch.float32), text)
    scores = ", ".join(f"{name} {kl:.4f}" for name, kl in chosen.budget_kl.items())
    console.print(
        f"patch order by KL to the teacher on {text.tokens} calibration tokens: blocks "
        f"{','.join(map(str, chosen.blocks))} (mean KL over sizes: {scores})",
        highlight=False,
    )
    return replace(sources, order=chosen.blocks, order_record=chosen.record())
