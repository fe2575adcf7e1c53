"""eval --tasks: lm-evaluation-harness tasks on every size, each model assembled in memory.

An optional extra (pip install 'layersplice[eval]'). Tasks from the harness's
registry download their data through `datasets`; tasks defined in an
--include-path folder can read local JSON-lines files and run offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layersplice.errors import LayerspliceError
from layersplice.evaluation.perplexity import (
    EvalRequest, FamilyModels, by_size, family_models, load_tokenizer, non_embedding_parameters, role_of,
)
from layersplice.planning.blocks import Order
from layersplice.planning.job import Job

# The harness reports "metric,filter" keys (e.g. "acc,none") beside bookkeeping such as sample_len.
STDERR_SUFFIX = "_stderr"


@dataclass(frozen=True)
class TaskResult:
    role: str
    layers: int
    parameters: int
    non_embedding_parameters: int
    keep: int | None
    scores: dict[str, dict[str, float]]  # task -> metric -> value


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise LayerspliceError(
            f"eval --tasks needs lm-evaluation-harness ({exc.name} is missing): pip install 'layersplice[eval]'"
        ) from None
    return lm_eval, HFLM, TaskManager


def task_manager(tasks: list[str], include_path: Path | None):
    """The harness's task registry (plus --include-path), with every task name checked up front."""
    _, _, TaskManager = _harness()
    if include_path is not None:
        # Indexing the harness's own ~15k task files takes seconds; skip it when --include-path has them all.
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in --include-path {include_path}" if include_path else "; add task YAMLs with --include-path DIR"
        raise LayerspliceError(f"--tasks: no lm-eval task named {unknown[0]!r} in the harness's registry{where}")
    return manager


def run_tasks(model, tokenizer, tasks: list[str], manager, batch_size: int, limit: int | None) -> dict[str, dict[str, float]]:
    """task -> metric -> value for one model (metrics as the harness names them, filter suffix dropped)."""
    lm_eval, HFLM, _ = _harness()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False, verbosity="ERROR",
    )
    scores = {}
    for task in tasks:
        metrics = output["results"][task]
        scores[task] = {
            name.split(",")[0]: float(value)
            for name, value in sorted(metrics.items())
            if "," in name and isinstance(value, (int, float)) and STDERR_SUFFIX not in name
        }
    return scores


def evaluate_tasks(job: Job, order: Order, request: EvalRequest, tasks: list[str], include_path: Path | None,
                   limit: int | None, on_size=None) -> tuple[list[TaskResult], dict]:
    manager = task_manager(tasks, include_path)
    family: FamilyModels = family_models(job, order, request)
    tokenizer = load_tokenizer(job.teacher.directory)
    results = []
    for keep, plan in sorted(family.sizes, key=by_size):
        if on_size:
            on_size(f"{plan.n_layers} layers: {', '.join(tasks)}")
        model = family.model_for(plan)
        scores = run_tasks(model, tokenizer, tasks, manager, request.batch_size, limit)
        results.append(TaskResult(role_of(plan, family.n_student), plan.n_layers, plan.params,
                                  non_embedding_parameters(model), keep, scores))
    meta = {"tasks": tasks, "limit": limit, "include_path": str(include_path) if include_path else None,
            **family.describe(request)}
    return results, meta


def headline_metric(scores: dict[str, float]) -> str:
    """acc when the task reports it, else its first metric."""
    return "acc" if "acc" in scores else sorted(scores)[0]
