"""eval and demo: measure every size of a family; the whole job on the embedded pair.

The demo chooses the blocks of every size by KL (the better of the greedy
order and the per-size search), plans, builds every size, evaluates them
against the naive baseline and plots, on the tiny fixture pair that ships with
the repository. Its texts are stdlib docstrings (evaluation/stdlib_text.py),
so it needs no network.

torch-heavy modules are imported inside the functions, so registering these
commands costs the CLI's start-up nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console

from layersplice import __version__
from layersplice.cli import display
from layersplice.checkpoint.atomic import refuse_overlap
from layersplice.checkpoint.strict_json import write_json
from layersplice.cli.orders import search_summary
from layersplice.cli.options import (
    SourceRequest,
    Sources,
    device_option,
    err_console,
    family_name,
    json_option,
    name_option,
    resolve_sources,
    source_options,
    text_field_option,
)
from layersplice.errors import LayerspliceError
from layersplice.evaluation.stdlib_text import CALIBRATION_MODULES, HELD_OUT_MODULES, write_documents
from layersplice.output.build import build_all
from layersplice.output.result_cards import Score, write_eval_cards
from layersplice.output.family import FamilyProblem, family_record
from layersplice.output.verify import MANIFEST_FILE
from layersplice.planning.alignment import AlignmentSpec

console = Console()
REPOSITORY = Path(__file__).resolve().parents[2]
RECIPE = REPOSITORY / "recipes" / "tiny.yaml"
SEQ_LEN = 128
MAX_TOKENS = 16384
CALIBRATION_TOKENS = 4096
DEMO_RECORD = "demo.json"  # the summary; marks the folder as the demo's
DEMO_MARK = "layersplice_demo"
# The demo searches every size by beam, within the work of the greedy order without its cache: on the
# fixture that finds the exhaustive search's sets in about a quarter of its time (bench/RESULTS.md).
DEMO_SEARCH_BUDGET = 0


@click.command("eval")
@source_options
@click.option("--data", type=click.Path(exists=True, path_type=Path), help="Held-out text: .txt, .jsonl, .parquet, or a folder of them.")
@click.option("--data-name",
              help="How reports and model cards name the --data text, e.g. 'WikiText-2 test'. Default: the file's name.")
@click.option("--sizes", default="all", show_default=True,
              help="'all' (the sizes `build --all` writes; with --models, those it holds) or --keep values such as 4,2,0.")
@click.option("--baseline", type=click.Choice(["naive"]), help="Also measure naive layer dropping: the teacher alone, same layers, no distillation.")
@click.option("--models", "models_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Read each size from this `build --all` output instead of assembling it in memory; alone, it "
                   "also names the teacher, student, alignment and order the sizes record.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Folder for eval.json, eval.csv, eval.png (and tasks.*). Default: out/<name>-eval.")
@name_option
@click.option("--seq-len", type=int, default=512, show_default=True, help="Window length in tokens (at most the model's context).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per forward pass.")
@click.option("--max-tokens", type=int, help="Use only the first N tokens of --data.")
@text_field_option
@device_option
@click.option("--tasks", help="lm-evaluation-harness tasks, comma-separated (pip install 'layersplice[eval]').")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Folder of extra lm-eval task YAMLs, e.g. on local JSON-lines data.")
@click.option("--limit", type=int, help="lm-eval: at most N examples per task.")
@click.option("--write-cards", is_flag=True,
              help="With --models: record each size's results in its model card (model-index and a table) and "
                   "re-seal its records.")
@json_option
def eval_command(data, data_name, sizes, baseline, models_dir, out, name, seq_len, batch_size, max_tokens, text_field,
                 device, tasks, include_path, limit, write_cards, as_json, **source_options) -> None:
    """Perplexity of every size on held-out text; optionally lm-eval tasks.

    Each size is assembled in memory from the teacher and student tensors
    (read once, shared by every size), or read from a `build --all` output
    with --models; --models alone is enough, the sizes' records name the
    rest. Writes a table, JSON, CSV and a PNG plot of parameters against
    perplexity, with the student and the teacher marked.

    \b
    Examples (from the root of a clone: recipes/ ships with the repository;
    `layersplice demo` writes out/demo/held-out.jsonl and out/demo/sizes/):
      layersplice eval --recipe recipes/tiny.yaml --data out/demo/held-out.jsonl --baseline naive
      layersplice eval --models out/demo/sizes --data out/demo/held-out.jsonl --data-name "stdlib docstrings"
      layersplice eval --teacher T --student S --data YOUR_TEXT.jsonl --sizes 8,4,0 --out evals/
      layersplice eval --recipe recipes/tiny.yaml --tasks YOUR_TASK --include-path YOUR_TASKS_DIR/
    """
    from layersplice.evaluation.perplexity import EvalRequest

    if data is None and not tasks:
        raise LayerspliceError("say what to measure: --data FILE (perplexity) and/or --tasks NAMES (lm-eval)")
    if write_cards and models_dir is None:
        raise LayerspliceError("--write-cards records results in the cards of built sizes: add --models DIR (a `build --all` output)")
    request = SourceRequest.pop_from(source_options)
    sources = resolve_sources(request if models_dir is None else _from_family(request, models_dir), out=out)
    job = sources.job
    name = name or (_built_name(models_dir) if models_dir and sources.recipe is None else None)
    name = family_name(sources, name)
    out = out or Path("out") / f"{name}-eval"
    request = EvalRequest(data, sizes, baseline == "naive", models_dir, seq_len, batch_size, max_tokens, device, text_field,
                          data_name)
    meta = {"layersplice_version": __version__, "name": name, "sources": job.describe_sources(), "order": sources.order_record}
    read = (("--data", data), ("--models", models_dir), ("--include-path", include_path))
    refuse_overlap(out, [*sources.inputs, *((what, path) for what, path in read if path is not None)])
    out.mkdir(parents=True, exist_ok=True)
    task_list = [t for t in tasks.split(",") if t] if tasks else []
    report, scores = _evaluate(sources, request, meta, out, task_list, include_path, limit,
                               Console(stderr=True) if as_json else console)
    if write_cards:
        cards = write_eval_cards(models_dir, scores)
        report["cards"] = [str(card) for card in cards]
        err_console.print(f"recorded results in {len(cards)} model cards; {models_dir} re-sealed", highlight=False)
    if as_json:
        display.echo_json(report)


def _evaluate(sources: Sources, request, meta: dict, out: Path, tasks: list[str], include_path, limit,
              shown: Console) -> tuple[dict, dict[int, list[Score]]]:
    """Perplexity and/or tasks; (the --json report, each size's scores by layer count for --write-cards)."""
    from layersplice.evaluation.report import size_row

    report: dict = {"layersplice_version": __version__, "name": meta["name"], "out": str(out),
                    "perplexity": None, "tasks": None}
    scores: dict[int, list[Score]] = {}
    if request.data is not None:
        results, paths = perplexity_run(sources, request, meta, out, shown)
        report["perplexity"] = {"data": str(request.data), "data_name": request.data_label,
                                "sizes": [size_row(r) for r in results], "files": _paths(paths)}
        for r in results:
            scores.setdefault(r.layers, []).append(Score(request.data_label, "perplexity", r.perplexity))
    if tasks:
        results, paths = tasks_run(sources, request, meta, out, tasks, include_path, limit, shown)
        report["tasks"] = {"files": _paths(paths), "sizes": [
            {"layers": r.layers, "parameters": r.parameters, "keep": r.keep, "scores": r.scores} for r in results]}
        for r in results:
            scores.setdefault(r.layers, []).extend(
                Score(task, metric, value) for task, metrics in r.scores.items() for metric, value in metrics.items())
    return report, scores


def _from_family(request: SourceRequest, models_dir: Path) -> SourceRequest:
    """The request with what it leaves out taken from the records of the `build --all` output in `models_dir`:
    the teacher and student, the alignment and the patch order its sizes were built with."""
    if request.recipe is not None:
        return request
    try:
        recorded, record_path, record = family_record(models_dir)
    except FamilyProblem as exc:
        raise LayerspliceError(f"--models {models_dir}: {exc}; give the output of `layersplice build --all`") from None
    filled = {}
    for role in ("teacher", "student"):
        source = recorded[role]
        if getattr(request, role) is None:
            if source["reference"] == source["directory"] and not Path(source["reference"]).expanduser().is_dir():
                raise LayerspliceError(
                    f"--models {models_dir}: its records name the {role} {source['reference']}, which is not a "
                    f"directory from here; run where the family was built, or pass --teacher and --student"
                )
            filled[role] = source["reference"]
            filled[f"{role}_revision"] = getattr(request, f"{role}_revision") or source.get("revision")
            filled[f"{role}_id"] = getattr(request, f"{role}_id") or source.get("hub_id")
    choice = record.get("choice") or {}
    if request.order is None and request.order_file is None:
        if "patch_order" in choice or "search" in choice:  # kl, search or --order-file: recorded, reused as it is
            filled["order_file"] = record_path
        else:
            filled["order"] = choice.get("order")
    copied = tuple(record["alignment"]["copied_teacher_layers"])
    return replace(request, **filled, recorded_alignment=AlignmentSpec(copied=copied, origin=str(record_path)))


def _built_name(models_dir: Path) -> str | None:
    """The --name a `build --all` output was built with: its sizes are NAME-<layers>L."""
    try:
        _, record_path, record = family_record(models_dir)
    except FamilyProblem:
        return None
    suffix = f"-{len(record['layers'])}L"
    directory = record_path.parent.name
    return directory.removesuffix(suffix) if directory.endswith(suffix) else None


def _paths(paths: dict[str, Path]) -> dict[str, str]:
    return {kind: str(path) for kind, path in paths.items()}


def perplexity_run(sources: Sources, request, meta: dict, out: Path, console: Console) -> tuple[list, dict[str, Path]]:
    """Measure, write eval.json/csv/png into `out`, print the table and the checks; (results, paths)."""
    from layersplice.evaluation.perplexity import evaluate_family
    from layersplice.evaluation.report import interpolation_summary, perplexity_table, write_perplexity_report

    with err_console.status("evaluating") as status:
        results, run = evaluate_family(sources.job, sources.order, request,
                                       on_size=lambda what: status.update(f"perplexity of {what}"))
    paths = write_perplexity_report(out, results, {**meta, **run})
    perplexity_table(console, results, f"perplexity on {request.data_label} ({run['data']['tokens']} tokens)")
    for line in interpolation_summary(results):
        console.print(line, highlight=False)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}", highlight=False)
    return results, paths


def tasks_run(sources: Sources, request, meta: dict, out: Path, tasks: list[str], include_path, limit,
              console: Console) -> tuple[list, dict[str, Path]]:
    """Run lm-eval tasks, write tasks.json/csv/png into `out`, print the table; (results, paths)."""
    from layersplice.evaluation.lm_tasks import evaluate_tasks
    from layersplice.evaluation.report import task_table, write_task_report

    with err_console.status("lm-eval") as status:
        results, run = evaluate_tasks(sources.job, sources.order, request, tasks, include_path, limit,
                                      on_size=lambda what: status.update(f"lm-eval on {what}"))
    paths = write_task_report(out, results, {**meta, **run})
    task_table(console, results, f"lm-eval: {', '.join(tasks)}")
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}", highlight=False)
    return results, paths


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/demo"), show_default=True,
              help="New or empty folder for every output, texts included (an earlier demo's is replaced).")
@json_option
def demo(out: Path, as_json: bool) -> None:
    """The whole job on the embedded tiny pair, offline, in under two minutes.

    Plans the family of recipes/tiny.yaml, builds every size, measures each
    one's perplexity on held-out text next to the naive layer-dropping
    baseline, plots it, and says where everything went. Everything goes
    into --out: the sizes, the report, and the texts it calibrates and
    measures on (calibration.jsonl, held-out.jsonl), which the examples of
    `eval --help` and `build --help` use.
    """
    summary = run_demo(out, Console(stderr=True) if as_json else console)
    if as_json:
        display.echo_json(summary)


def run_demo(out: Path, console: Console) -> dict:
    """Everything the demo does; returns the summary it prints."""
    import torch

    from layersplice.evaluation.perplexity import EvalRequest
    from layersplice.evaluation.report import interpolation_summary, size_row

    if not RECIPE.exists():
        raise LayerspliceError(f"{RECIPE} is missing: the demo runs from a clone of the layersplice repository")
    # The fixture models are so small that a second thread only adds overhead.
    torch.set_num_threads(1)
    started = time.perf_counter()
    sources = resolve_sources(SourceRequest(recipe=RECIPE))
    refuse_overlap(out, sources.inputs)
    _claim_demo_folder(out)
    sources = with_better_order(sources, write_documents(out / "calibration.jsonl", CALIBRATION_MODULES), console)
    job, name = sources.job, sources.recipe.name
    display.plan_table(console, job, sources.order, display.plan_rows(job, sources.order))
    sizes_dir = out / "sizes"
    built = build_all(job, sources.order, sizes_dir, name, sources.shard_size, force=True,
                      order_record=sources.order_record, inputs=sources.inputs)
    display.built_table(console, built, sizes_dir)
    held_out = write_documents(out / "held-out.jsonl", HELD_OUT_MODULES)
    request = EvalRequest(held_out, baseline=True, models_dir=sizes_dir, seq_len=SEQ_LEN, max_tokens=MAX_TOKENS, device="cpu")
    meta = {"layersplice_version": __version__, "name": name, "sources": job.describe_sources(), "order": sources.order_record}
    results, paths = perplexity_run(sources, request, meta, out, console)
    seconds = time.perf_counter() - started
    console.print(
        f"demo done in {seconds:.0f} s. In {out}: sizes/ ({len(built)} checkpoints and {MANIFEST_FILE}), "
        f"{', '.join(p.name for p in paths.values())}, {DEMO_RECORD}, and the texts calibration.jsonl and held-out.jsonl",
        highlight=False,
    )
    summary = {
        DEMO_MARK: __version__,
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
    write_json(out / DEMO_RECORD, summary)
    return summary


def _claim_demo_folder(out: Path) -> None:
    """Make `out` the demo's: new, empty, or an earlier demo's (its demo.json says so); never a user's folder,
    whose held-out.jsonl or eval.json the demo would overwrite."""
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = json.loads((out / DEMO_RECORD).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if not isinstance(earlier, dict) or DEMO_MARK not in earlier:
            raise LayerspliceError(
                f"--out {out} holds files that are not an earlier demo's (no {DEMO_RECORD}); the demo writes "
                "its texts, sizes and report there, so give a new or empty folder"
            )
    elif out.exists() and not out.is_dir():
        raise LayerspliceError(f"--out {out} is not a folder; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    # Marked at once, so that a rerun after an interrupted demo replaces it.
    write_json(out / DEMO_RECORD, {DEMO_MARK: __version__, "complete": False})


def with_better_order(sources: Sources, calibration: Path, console: Console) -> Sources:
    """The sources with the better of --order kl and --order search on a few thousand calibration tokens.

    Better is the lower mean KL to the teacher over parameter budgets, along
    each one's sizes. The search scores greedy's set at every size too, so it
    wins unless they tie."""
    import torch

    from layersplice.evaluation.in_memory import LoadedPair
    from layersplice.evaluation.perplexity import load_text, load_tokenizer
    from layersplice.evaluation.search_order import search_order

    job = sources.job
    text = load_text(calibration, load_tokenizer(job.teacher.directory), SEQ_LEN, CALIBRATION_TOKENS)
    found = search_order(LoadedPair(job, torch.device("cpu"), torch.float32), text, DEMO_SEARCH_BUDGET)
    kl = found.kl
    budget = found.budget_kl
    use_search = budget["search"] <= budget.get("greedy", budget["search"])
    console.print(
        f"patch order by KL to the teacher on {text.tokens} calibration tokens: greedy blocks "
        f"{','.join(map(str, kl.greedy))}; the search's sizes (mean KL over sizes: search {budget['search']:.4f}, "
        f"greedy {budget.get('greedy', float('nan')):.4f}): using {'search' if use_search else 'kl'}",
        highlight=False,
    )
    if use_search:
        for line in search_summary(found.record()["search"]):
            console.print(line, highlight=False)
        return replace(sources, order=found.choices(), order_record=found.record())
    return replace(sources, order=kl.blocks, order_record=kl.record())
