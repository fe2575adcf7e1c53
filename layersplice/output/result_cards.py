"""eval --write-cards: each size's results as model-index entries in its card.

A size's card is listed with its checksum in the size's sealed
layersplice.json, which the family's part records and manifest list in turn.
So a new card means new records all the way up: the size is rewritten through
atomic_directory (its unchanged files hard-linked, not copied), then the part
records and the manifest are re-derived (family.py). `verify` passes after.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from layersplice.checkpoint.atomic import atomic_directory, output_lock
from layersplice.checkpoint.sealed_json import read_sealed, replace_sealed, write_sealed
from layersplice.errors import OutputError
from layersplice.output.card import CARD_FILE
from layersplice.output.family import (
    MANIFEST_FILE, PARTS_DIR, PROVENANCE_FILE, FamilyProblem, file_record, refresh_parts, size_entry,
)


RESULTS_HEADING = "## Evaluation results"


@dataclass(frozen=True)
class Score:
    """One result of one size: perplexity on a text, or a metric of an lm-eval task."""

    dataset: str  # as the card names it: eval's --data-name, or the task
    metric: str
    value: float


def write_eval_cards(family: Path, scores: dict[int, list[Score]]) -> list[Path]:
    """Record `scores` ({layers: results}) in the cards of the family's sizes; returns the cards written."""
    manifest, problem = read_sealed(family / MANIFEST_FILE)
    if problem:
        raise OutputError(f"--write-cards {family}: {problem}")
    directories = {entry["layers"]: family / entry["directory"] for entry in manifest["sizes"]}
    targets = {directories[layers]: results for layers, results in sorted(scores.items()) if layers in directories}
    for directory in targets:  # every check before the first write
        if not (directory / CARD_FILE).is_file():
            raise OutputError(
                f"--write-cards: {directory} has no {CARD_FILE} (built with --no-card); rebuild it without --no-card"
            )
    with output_lock(family):  # the family's records are rewritten: no build part may write meanwhile
        for directory, results in targets.items():
            _reseal_with_results(directory, results)
        try:
            if (family / PARTS_DIR).is_dir():
                refresh_parts(family)
            else:  # a family written before part records existed
                sizes = [size_entry(family / entry["directory"]) for entry in manifest["sizes"]]
                replace_sealed(family / MANIFEST_FILE, {**manifest, "sizes": sizes})
        except FamilyProblem as exc:
            raise OutputError(f"--write-cards {family}: {exc}") from None
    return [directory / CARD_FILE for directory in targets]


def card_with_results(text: str, name: str, results: list[Score]) -> str:
    """The card text with `results` as model-index entries, replacing earlier ones of the same dataset and
    metric, and every entry as a table in the body."""
    from huggingface_hub import EvalResult, ModelCard

    card = ModelCard(text)
    task = card.data.pipeline_tag or "text-generation"
    new = [
        EvalResult(task_type=task, dataset_type=dataset_type(s.dataset), dataset_name=s.dataset,
                   metric_type=s.metric, metric_value=s.value)
        for s in results
    ]
    # Keyed by the dataset's name, which cards of every version record as given (dataset_type was once the name too)
    replaced = {(r.dataset_name, r.metric_type) for r in new}
    kept = [r for r in card.data.eval_results or [] if (r.dataset_name, r.metric_type) not in replaced]
    card.data.eval_results = kept + new
    card.data.model_name = card.data.model_name or name
    card.text = _with_results_table(card.text, card.data.eval_results)
    return str(card)


def dataset_type(name: str) -> str:
    """The model-index dataset `type`: an identifier made of the dataset's name ('WikiText-2 test' -> 'wikitext-2-test')."""
    return re.sub(r"[^a-z0-9._]+", "-", name.lower()).strip("-") or "text"


def _with_results_table(body: str, results: list) -> str:
    """The body with its results section (re)written from every model-index entry, before the first other section."""
    rows = "\n".join(f"| {r.dataset_name} | {r.metric_type} | {r.metric_value:.4f} |" for r in results)
    section = f"{RESULTS_HEADING}\n\n| dataset | metric | value |\n|---|---|---:|\n{rows}\n\n"
    start = body.find(RESULTS_HEADING)
    if start >= 0:
        end = body.find("\n## ", start + len(RESULTS_HEADING))
        return body[:start] + section + (body[end + 1:] if end >= 0 else "")
    first = body.find("\n## ")
    return body + "\n" + section if first < 0 else body[:first + 1] + section + body[first + 1:]


def _reseal_with_results(directory: Path, results: list[Score]) -> None:
    provenance, problem = read_sealed(directory / PROVENANCE_FILE)
    if problem:
        raise OutputError(f"--write-cards {directory}: {problem}")
    text = card_with_results((directory / CARD_FILE).read_text(encoding="utf-8"), directory.name, results)
    # The size is rewritten in place on purpose (its card gains the results); nothing else is read.
    with atomic_directory(directory, force=True, inputs=()) as tmp:
        for path in sorted(directory.iterdir()):
            if path.name not in (CARD_FILE, PROVENANCE_FILE):
                _link_or_copy(path, tmp / path.name)
        (tmp / CARD_FILE).write_text(text, encoding="utf-8")
        files = {**provenance["files"], CARD_FILE: file_record(tmp / CARD_FILE)}
        write_sealed(tmp / PROVENANCE_FILE, {**provenance, "files": files})


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (no bytes copied), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
