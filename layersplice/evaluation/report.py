"""What `eval` leaves behind: a rich table, JSON, CSV and a PNG plot."""

from __future__ import annotations

import csv
from pathlib import Path

from rich.console import Console
from rich.table import Table

from layersplice.checkpoint.strict_json import write_json
from layersplice.evaluation.perplexity import INTERPOLATED_ROLE, STUDENT_ROLE, TEACHER_ROLE, SizeResult
from layersplice.evaluation.plot import Curve, plot_family
from layersplice.units import format_params

PERPLEXITY_FILES = ("eval.json", "eval.csv", "eval.png")
TASK_FILES = ("tasks.json", "tasks.csv", "tasks.png")
LOG_SCALE_SPREAD = 10  # a log perplexity axis once the worst is 10x the best (naive dropping often is)


def size_row(result: SizeResult) -> dict:
    return {
        "role": result.role,
        "layers": result.layers,
        "parameters": result.parameters,
        "non_embedding_parameters": result.non_embedding_parameters,
        "bytes": result.bytes,
        "keep": result.keep,
        "patched_blocks": list(result.patched_blocks),
        "perplexity": result.perplexity,
        "tokens": result.tokens,
        "naive_perplexity": result.naive_perplexity,
        "naive_parameters": result.naive_parameters,
        "margin_vs_naive": result.margin,
    }


def write_perplexity_report(out: Path, results: list[SizeResult], meta: dict) -> dict[str, Path]:
    """eval.json, eval.csv and eval.png in `out`; returns {kind: path}."""
    rows = [size_row(r) for r in results]
    paths = dict(zip(("json", "csv", "png"), (out / name for name in PERPLEXITY_FILES)))
    write_json(paths["json"], {**meta, "sizes": rows})
    write_csv(paths["csv"], rows)
    # Non-embedding parameters grow with the layer count alone; the full count
    # does not (a size whose head is untied stores one more vocabulary matrix).
    core = [r.non_embedding_parameters for r in results]
    curves = [Curve("boomerang interpolation", core, [r.perplexity for r in results],
                    point_labels=[f"{r.layers}L" for r in results])]
    if all(r.naive_perplexity is not None for r in results):
        curves.append(Curve("naive layer dropping (no distillation)", core, [r.naive_perplexity for r in results], "--"))
    student, teacher = _ends(results)
    plot_family(paths["png"], curves, (student.non_embedding_parameters, student.perplexity),
                (teacher.non_embedding_parameters, teacher.perplexity), "perplexity (held-out text)",
                f"Perplexity against size: {meta.get('name', '')}".rstrip(": "),
                log_y=_spread(curves) > LOG_SCALE_SPREAD, xlabel="non-embedding parameters")
    return paths


def _spread(curves: list[Curve]) -> float:
    values = [v for curve in curves for v in curve.values]
    return max(values) / min(values)


def _ends(results: list) -> tuple:
    """The student and the teacher rows; the smallest and largest size when either was not evaluated."""
    by_role = {r.role: r for r in results}
    return by_role.get(STUDENT_ROLE, results[0]), by_role.get(TEACHER_ROLE, results[-1])


def perplexity_table(console: Console, results: list[SizeResult], title: str) -> None:
    table = Table(title=title)
    naive = any(r.naive_perplexity is not None for r in results)
    columns = ["model", "layers", "parameters", "perplexity"] + (["naive dropping", "margin"] if naive else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in results:
        row = [r.role, str(r.layers), format_params(r.parameters), f"{r.perplexity:.3f}"]
        if naive:
            margin = "" if r.role == TEACHER_ROLE else f"{r.margin:+.3f}"
            row += [f"{r.naive_perplexity:.3f}", margin]
        table.add_row(*row)
    console.print(table)


def interpolation_summary(results: list[SizeResult]) -> list[str]:
    """One line a check of what the method promises: a gap to bridge, ordered, bracketed, better than naive."""
    student, teacher = _ends(results)
    middle = [r for r in results if r.role == INTERPOLATED_ROLE]
    values = [r.perplexity for r in results]
    low, high = sorted((student.perplexity, teacher.perplexity))
    lines = [
        f"student {student.perplexity:.3f} -> teacher {teacher.perplexity:.3f} perplexity "
        f"(the student's is {student.perplexity / teacher.perplexity:.2f}x the teacher's); "
        f"{sum(low < r.perplexity < high for r in middle)}/{len(middle)} interpolated sizes lie between them",
        "perplexity falls as size grows: " + ("yes" if all(a > b for a, b in zip(values, values[1:])) else "no"),
    ]
    margins = {r.layers: r.margin for r in middle if r.margin is not None}
    if margins:
        smallest = min(margins, key=margins.get)
        lines.append(
            f"better than naive layer dropping at {sum(m > 0 for m in margins.values())}/{len(margins)} interpolated "
            f"sizes; smallest margin {margins[smallest]:+.3f} perplexity (at {smallest} layers), "
            f"largest {max(margins.values()):+.3f}"
        )
    return lines


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})


def write_task_report(out: Path, results: list, meta: dict) -> dict[str, Path]:
    """tasks.json, tasks.csv and tasks.png (each task's accuracy against parameters)."""
    from layersplice.evaluation.lm_tasks import headline_metric

    paths = dict(zip(("json", "csv", "png"), (out / name for name in TASK_FILES)))
    base = [{"role": r.role, "layers": r.layers, "parameters": r.parameters,
             "non_embedding_parameters": r.non_embedding_parameters, "keep": r.keep} for r in results]
    write_json(paths["json"], {**meta, "sizes": [{**row, "scores": r.scores} for row, r in zip(base, results)]})
    write_csv(paths["csv"], [
        {**row, **{f"{task}/{metric}": value for task, metrics in r.scores.items() for metric, value in metrics.items()}}
        for row, r in zip(base, results)
    ])
    tasks = list(results[0].scores)
    metric = {task: headline_metric(results[0].scores[task]) for task in tasks}
    core = [r.non_embedding_parameters for r in results]
    curves = [Curve(f"{task} ({metric[task]})", core, [r.scores[task][metric[task]] for r in results]) for task in tasks]
    first = tasks[0]
    student, teacher = _ends(results)
    plot_family(paths["png"], curves, (student.non_embedding_parameters, student.scores[first][metric[first]]),
                (teacher.non_embedding_parameters, teacher.scores[first][metric[first]]),
                "accuracy", f"lm-eval accuracy against size: {meta.get('name', '')}".rstrip(": "),
                xlabel="non-embedding parameters")
    return paths


def task_table(console: Console, results: list, title: str) -> None:
    from layersplice.evaluation.lm_tasks import headline_metric

    table = Table(title=title)
    tasks = list(results[0].scores)
    for column in ["model", "layers", "parameters", *tasks]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in results:
        cells = [f"{r.scores[t][headline_metric(r.scores[t])]:.4f}" for t in tasks]
        table.add_row(r.role, str(r.layers), format_params(r.parameters), *cells)
    console.print(table)
