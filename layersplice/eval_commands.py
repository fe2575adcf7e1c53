"""eval and demo: measure every size of a family; the whole job on the embedded pair.

torch-heavy modules are imported inside the commands, so registering these
commands costs the CLI's start-up nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console

from layersplice import __version__
from layersplice.cli import Sources, cli, err_console, source_options, with_sources
from layersplice.errors import LayerspliceError

console = Console()


@cli.command("eval")
@source_options
@click.option("--data", type=click.Path(exists=True, path_type=Path), help="Held-out text: .txt, .jsonl, .parquet, or a folder of them.")
@click.option("--sizes", default="all", show_default=True, help="'all' (the sizes `build --all` writes) or --keep values such as 4,2,0.")
@click.option("--baseline", type=click.Choice(["naive"]), help="Also measure naive layer dropping: the teacher alone, same layers, no distillation.")
@click.option("--models", "models_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Read each size from this `build --all` output instead of assembling it in memory.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Folder for eval.json, eval.csv, eval.png (and tasks.*). Default: out/<name>-eval.")
@click.option("--name", help="Name shown in titles and the default --out. Default: the recipe's name, else the teacher's folder name.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Window length in tokens (at most the model's context).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per forward pass.")
@click.option("--max-tokens", type=int, help="Use only the first N tokens of --data.")
@click.option("--text-field", default="text", show_default=True, help="Field that holds the text in .jsonl/.parquet data.")
@click.option("--device", default="auto", show_default=True, help="auto (the GPU if there is one), cpu, cuda, cuda:1, ...")
@click.option("--tasks", help="lm-evaluation-harness tasks, comma-separated (pip install 'layersplice[eval]').")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Folder of extra lm-eval task YAMLs, e.g. on local JSON-lines data.")
@click.option("--limit", type=int, help="lm-eval: at most N examples per task.")
@with_sources
def eval_command(sources: Sources, data, sizes, baseline, models_dir, out, name, seq_len, batch_size, max_tokens,
                 text_field, device, tasks, include_path, limit) -> None:
    """Perplexity of every size on held-out text; optionally lm-eval tasks.

    Each size is assembled in memory from the teacher and student tensors
    (read once, shared by every size), or read from a `build --all` output
    with --models. Writes a table, JSON, CSV and a PNG plot of parameters
    against perplexity, with the student and the teacher marked.

    \b
    Examples:
      layersplice eval --recipe recipes/tiny.yaml --data held-out.jsonl --baseline naive
      layersplice eval --teacher T --student S --data wiki.jsonl --sizes 8,4,0 --out evals/
      layersplice eval --recipe recipes/tiny.yaml --tasks my_mc --include-path tasks/
    """
    from layersplice.evaluate import EvalRequest

    if data is None and not tasks:
        raise LayerspliceError("say what to measure: --data FILE (perplexity) and/or --tasks NAMES (lm-eval)")
    job = sources.job
    name = name or (sources.recipe.name if sources.recipe else Path(job.teacher.directory).name)
    out = out or Path("out") / f"{name}-eval"
    request = EvalRequest(data, sizes, baseline == "naive", models_dir, seq_len, batch_size, max_tokens, device, text_field)
    meta = {"layersplice_version": __version__, "name": name, "sources": job.describe_sources(), "order": sources.order_record}
    out.mkdir(parents=True, exist_ok=True)
    if data is not None:
        perplexity_run(sources, request, meta, out, console)
    if tasks:
        tasks_run(sources, request, meta, out, [t for t in tasks.split(",") if t], include_path, limit)


def perplexity_run(sources: Sources, request, meta: dict, out: Path, console: Console) -> tuple[list, dict[str, Path]]:
    """Measure, write eval.json/csv/png into `out`, print the table and the checks; (results, paths)."""
    from layersplice.eval_report import interpolation_summary, perplexity_table, write_perplexity_report
    from layersplice.evaluate import evaluate_family

    with err_console.status("evaluating") as status:
        results, run = evaluate_family(sources.job, sources.order, request,
                                       on_size=lambda what: status.update(f"perplexity of {what}"))
    paths = write_perplexity_report(out, results, {**meta, **run})
    perplexity_table(console, results, f"perplexity on {request.data} ({run['data']['tokens']} tokens)")
    for line in interpolation_summary(results):
        console.print(line, highlight=False)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}", highlight=False)
    return results, paths


def tasks_run(sources: Sources, request, meta: dict, out: Path, tasks: list[str], include_path, limit) -> None:
    from layersplice.eval_report import task_table, write_task_report
    from layersplice.lm_tasks import evaluate_tasks

    with err_console.status("lm-eval") as status:
        results, run = evaluate_tasks(sources.job, sources.order, request, tasks, include_path, limit,
                                      on_size=lambda what: status.update(f"lm-eval on {what}"))
    paths = write_task_report(out, results, {**meta, **run})
    task_table(console, results, f"lm-eval: {', '.join(tasks)}")
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}", highlight=False)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/demo"), show_default=True, help="Where every output goes (replaced if it is an earlier demo).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo(out: Path, as_json: bool) -> None:
    """The whole job on the embedded tiny pair, offline, in about a minute.

    Plans the family of recipes/tiny.yaml, builds every size, measures each
    one's perplexity on held-out text next to the naive layer-dropping
    baseline, plots it, and says where everything went.
    """
    from layersplice.demo import run_demo

    summary = run_demo(out, Console(stderr=True) if as_json else console)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
