"""A finished run's --out made publishable like a build output (rank 0, after export_student).

--out then holds exactly the student's files, its model card (README.md),
metrics.jsonl and a sealed layersplice.json that lists each of them with its
BLAKE3: `layersplice verify OUT` passes on the directory as the run left it,
and `hf upload ORG/NAME OUT` publishes what verify checked. The resume
checkpoints are removed once the record is sealed: the run is over, and they
are several times the student's size (fp32 weights and optimizer state).
--keep-checkpoints keeps them; verify then needs --allow-extra checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from layersplice import __version__
from layersplice.checkpoint.atomic import is_working_file
from layersplice.checkpoint.sealed_json import read_sealed, replace_sealed
from layersplice.checkpoint.source import Checkpoint, declare_hub_id, open_checkpoint
from layersplice.distill.checkpoints import CHECKPOINT_DIR
from layersplice.distill.config import DataSpec, DistillConfig
from layersplice.distill.progress import METRICS_NAME
from layersplice.errors import OutputError
from layersplice.output.card import CARD_FILE, DistilledFacts, distilled_card, source_arguments
from layersplice.output.family import DISTILLED, PROVENANCE_FILE, file_record
from layersplice.planning.alignment import STUDENT_CONFIG_NAME, Alignment
from layersplice.units import format_params

# Options that name the models or the output, or change nothing in the result:
# the card's command gives the sources (by a declared Hub id) and --out on its own terms.
NOT_IN_THE_COMMAND = {"teacher", "student", "teacher_revision", "student_revision", "teacher_id", "student_id",
                      "out", "resume", "json", "keep_checkpoints", "hub_owner"}


def refuse_a_finished_run(config: DistillConfig) -> None:
    """An --out that holds a sealed distill record is a finished run: nothing to resume, no place for another."""
    record, problem = read_sealed(config.out / PROVENANCE_FILE)
    if problem is None and record.get("kind") == DISTILLED:
        raise OutputError(
            f"--out {config.out} holds a finished run (its student is sealed in {PROVENANCE_FILE}); "
            "choose a new --out, and give this one as --student to train it further"
        )


def seal_student(config: DistillConfig, alignment: Alignment) -> dict:
    """Write the card and the sealed record, drop the resume checkpoints; what --json prints."""
    out = config.out
    teacher, student = _named(config, "teacher"), _named(config, "student")
    output = open_checkpoint(out)
    params = sum(t.numel for t in output.tensors.values())
    final = _final_metrics(out / METRICS_NAME)
    command = _command(config, teacher, student)
    card = distilled_card(DistilledFacts(
        out.name, teacher, student, alignment, output.config, params, command,
        _facts(config, final), _hub_datasets(config.data),
        (config.settings.values.get("hub_owner") if config.settings else None),
    ))
    (out / CARD_FILE).write_text(card, encoding="utf-8")
    files = {p.name: file_record(p) for p in sorted(out.iterdir())
             if p.is_file() and p.name != PROVENANCE_FILE and not is_working_file(p.name)}
    record = {
        "layersplice_version": __version__,
        "kind": DISTILLED,
        "sources": {"teacher": teacher.describe(), "student": student.describe()},
        "alignment": {"copied_teacher_layers": list(alignment.copied), "teacher_layers": alignment.n_teacher,
                      "from": f"{STUDENT_CONFIG_NAME} of the student"},
        "training": {**config.run_identity(), "tokens": _tokens(config)},
        "final_metrics": final,
        **_settings_record(config),
        "dtype": sorted({t.dtype for t in output.tensors.values()}),
        "parameters": params,
        "files": files,
    }
    replace_sealed(out / PROVENANCE_FILE, record)
    if not config.keep_checkpoints:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return {
        "layersplice_version": __version__,
        "out": str(out),
        "outputs": [{"directory": str(out), "layers": alignment.n_student, "parameters": params,
                     "bytes": sum(f["size"] for f in files.values()),
                     "files": {**files, PROVENANCE_FILE: file_record(out / PROVENANCE_FILE)}}],
        "final_metrics": final,
    }


def _named(config: DistillConfig, role: str) -> Checkpoint:
    """The teacher or student directory, under the name (path or Hub id) and revision the user gave,
    and as a copy of the Hub repo its --ROLE-id declares, as build's sources are."""
    directory = getattr(config, role)
    values = config.settings.values if config.settings else {}
    reference = values.get(role) or str(directory)
    named = dataclasses.replace(open_checkpoint(directory), reference=reference,
                                revision=values.get(f"{role}_revision"))
    return declare_hub_id(named, values.get(f"{role}_id"), f"--{role}-id")


def _settings_record(config: DistillConfig) -> dict:
    if config.settings is None:
        return {}
    return {"settings": config.settings.values, "settings_from": config.settings.origins,
            "config_file": config.settings.config_file}


def _command(config: DistillConfig, teacher: Checkpoint, student: Checkpoint) -> list[str] | None:
    """The distill command of this run: the sources, every option the user set (in the file or on the
    command line), and --out by its name."""
    if config.settings is None:
        return None
    arguments = ["layersplice", "distill", *source_arguments(teacher, "--teacher", "--teacher-revision"),
                 *source_arguments(student, "--student", "--student-revision")]
    for key, value in config.settings.values.items():
        if key in config.settings.origins and key not in NOT_IN_THE_COMMAND:
            flag = "--" + key.replace("_", "-")
            if value is True:
                arguments.append(flag)
            elif isinstance(value, list):
                arguments += [part for item in value for part in (flag, str(item))]
            elif value is not None and value is not False:
                arguments += [flag, str(value)]
    return [*arguments, "--out", config.out.name]


def _tokens(config: DistillConfig) -> int:
    return config.steps * config.batch_size * config.data.seq_len


def _final_metrics(path: Path) -> dict:
    """The last training step's and the last validation's records of metrics.jsonl."""
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    train = [r for r in records if "loss" in r]
    validation = [r for r in records if "val_loss" in r]
    return {"train": train[-1] if train else None, "validation": validation[-1] if validation else None}


def _facts(config: DistillConfig, final: dict) -> tuple[str, ...]:
    """The card's lines on the data, the training and its result."""
    data = config.data
    loss = config.loss
    facts = [
        f"Data: {_data_source(data)}",
        f"Training: {config.steps:,} steps of {config.batch_size:,} sequences of {data.seq_len:,} tokens "
        f"({format_params(_tokens(config))} tokens); AdamW, lr {config.lr:g}, cosine schedule, "
        f"warmup {config.warmup:g} of the steps, weight decay {config.weight_decay:g}; loss CE + "
        f"{loss.kl:g} KL (T = {loss.temperature:g}) + {loss.cos:g} cosine",
    ]
    train, validation = final["train"], final["validation"]
    if train:
        facts.append(f"Final training loss {train['loss']:.4f} (CE {train['ce']:.4f}) at step {train['step']}")
    if validation:
        facts.append(f"Validation loss {validation['val_loss']:.4f} (CE {validation['val_ce']:.4f}) "
                     f"at step {validation['step']}")
    return tuple(facts)


def _data_source(data: DataSpec) -> str:
    if data.synthetic:
        return "random tokens (--synthetic-data: a benchmark run, not a trained language model)"
    held_out = (f"{data.val_fraction:g} of the documents" if data.val_fraction is not None
                else f"the first {data.held_out_tokens:,} tokens")
    if data.dataset is not None:
        named = f"`{data.dataset}`" + (f" ({data.dataset_config})" if data.dataset_config else "")
        return f"{named}, split {data.split}; {held_out} held out for validation"
    files = ", ".join(f"`{Path(f).name}`" for f in data.files)
    return f"local text {files} (field `{data.text_field}`); {held_out} held out for validation"


def _hub_datasets(data: DataSpec) -> tuple[str, ...]:
    """The dataset as a Hub id, for the card's front matter (a local folder is no Hub dataset)."""
    if data.dataset is None or Path(data.dataset).expanduser().exists():
        return ()
    return (data.dataset,)
