"""The model card (README.md) written into every output.

Front matter the Hub reads (base models, relation, pipeline, tags, the
teacher's license), then what the model is, where every layer came from, the
command that rebuilds it and how to load it. Written with huggingface_hub's
ModelCard/ModelCardData, offline: no template download, no network.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from layersplice.checkpoint.source import Checkpoint
from layersplice.output.family import searched_size
from layersplice.planning.alignment import Alignment
from layersplice.planning.job import Job
from layersplice.planning.plan import Plan
from layersplice.units import format_params

CARD_FILE = "README.md"
PAPER = "https://arxiv.org/abs/2510.05064"
TAGS = ["layersplice", "boomerang-distillation"]
DEFAULT_SHARD_SIZE = 5 * 10**9
# pipeline_tag follows the model class the config names (its `architectures`),
# not the family: one family (bert) holds both a bare encoder and a masked LM.
PIPELINES = (
    ("ForCausalLM", "text-generation", "AutoModelForCausalLM"),
    ("LMHeadModel", "text-generation", "AutoModelForCausalLM"),
    ("ForMaskedLM", "fill-mask", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "text-classification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "token-classification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "question-answering", "AutoModelForQuestionAnswering"),
    ("Model", "feature-extraction", "AutoModel"),
)
COMMIT = re.compile(r"[0-9a-f]{40}")
DTYPE_OPTIONS = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


@dataclass(frozen=True)
class CardFacts:
    """Everything one card says, gathered by the caller from the job and the plan."""

    name: str  # the output directory's name
    what: str  # one paragraph: what the model is
    base_models: tuple[Checkpoint, ...]
    plan: Plan
    config: dict
    command: list[str]


def is_hub_id(checkpoint: Checkpoint) -> bool:
    """A checkpoint named by a Hub repo id (resolved through the cache), not by a local path."""
    return Path(checkpoint.reference).expanduser() != checkpoint.directory


def pipeline_of(config: dict) -> tuple[str | None, str]:
    """(pipeline_tag, transformers Auto class) for the model class the config names."""
    for architecture in config.get("architectures") or ():
        for suffix, tag, auto in PIPELINES:
            if architecture.endswith(suffix):
                return tag, auto
    return None, "AutoModel"


def teacher_license(teacher: Checkpoint) -> str | None:
    """The license the teacher's own card states, if it has a card that states one."""
    from huggingface_hub import ModelCard

    path = teacher.directory / CARD_FILE
    if not path.is_file():
        return None
    try:
        license_ = ModelCard.load(path).data.license
    except (ValueError, OSError, UnicodeDecodeError):
        return None  # a card we cannot parse says nothing we can pass on
    return license_ if isinstance(license_, str) and license_ else None


def render(facts: CardFacts, license_: str | None) -> str:
    """The card's text: YAML front matter, then the body."""
    from huggingface_hub import ModelCard, ModelCardData

    pipeline_tag, _ = pipeline_of(facts.config)
    hub_ids = [c.reference for c in facts.base_models if is_hub_id(c)]
    data = ModelCardData(
        base_model=hub_ids or None,
        library_name="transformers",
        license=license_,
        pipeline_tag=pipeline_tag,
        tags=list(TAGS),
        # The relation only means something next to base_model.
        **({"base_model_relation": "merge"} if hub_ids else {}),
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(facts)}"))


def _body(facts: CardFacts) -> str:
    plan = facts.plan
    _, auto = pipeline_of(facts.config)
    rows = "\n".join(
        f"| {layer.index} | {layer.model} | {layer.source_layer} | {layer.block} |" for layer in plan.layers
    )
    return f"""# {facts.name}

{facts.what}

- Layers: {plan.n_layers}
- Parameters: {format_params(plan.params)} ({plan.params:,})
- Embeddings from the {plan.embeddings_from}; final norm and head from the {plan.head_from}

## Where every layer came from

| output layer | from | source layer | student block |
|---:|---|---:|---:|
{rows}

## Rebuild it

```bash
{shlex.join(facts.command)}
```

`layersplice verify {shlex.quote(facts.name)}` re-checks every file against the sealed `layersplice.json`.

## Use it

```python
from transformers import {auto}, AutoTokenizer

model = {auto}.from_pretrained("{facts.name}")
tokenizer = AutoTokenizer.from_pretrained("{facts.name}")
```
"""


def source_arguments(checkpoint: Checkpoint, option: str, revision_option: str) -> list[str]:
    """`--teacher REF [--teacher-revision R]`: a model as the command line names it.

    A Hub model is pinned to the commit that was read (the name of its
    snapshot folder in the cache), so the command rebuilds these very bytes
    after the repository moves on."""
    arguments = [option, checkpoint.reference]
    revision = checkpoint.revision
    if is_hub_id(checkpoint) and COMMIT.fullmatch(checkpoint.directory.name):
        revision = checkpoint.directory.name
    if revision:
        arguments += [revision_option, revision]
    return arguments


def output_arguments(cast: str | None, shard_size: int, out: str) -> list[str]:
    arguments = ["--dtype", DTYPE_OPTIONS[cast]] if cast else []
    if shard_size != DEFAULT_SHARD_SIZE:
        arguments += ["--shard-size", f"{shard_size}B"]
    return arguments + ["--out", out]


def interpolated_what(teacher: Checkpoint, student: Checkpoint, n_teacher: int, n_student: int) -> str:
    return (
        f"A size between the teacher `{teacher.reference}` ({n_teacher} layers) and its student "
        f"`{student.reference}` ({n_student} layers), made by "
        f"[boomerang distillation]({PAPER}) interpolation: each student block is either kept or "
        "replaced by the teacher layers it was distilled to stand for. No training: every tensor is "
        "copied byte for byte (or cast) from the teacher or the student by `layersplice build`."
    )


def search_reason(choice: dict | None, plan: Plan) -> str:
    """Why this size patches its blocks, when `--order search` chose them ('' otherwise)."""
    size = searched_size(choice, plan.n_layers, plan.patched)
    if size is None:
        return ""
    search = choice["search"]
    blocks = ", ".join(map(str, size["patched_blocks"]))
    calibration = search.get("calibration") or {}
    text = f"{calibration.get('tokens', '?')} tokens of `{Path(str(calibration.get('path', '?'))).name}`"
    if size["method"] == "exact":
        how = f"of all {size['subsets']} sets of blocks that make models of {plan.n_layers} layers"
    else:
        how = (f"of the {size['scored']} sets, out of the {size['subsets']} that make models of {plan.n_layers} "
               "layers, that a beam search scored")
    if size.get("greedy_patched_blocks") is None:
        greedy = ""
    elif sorted(size["greedy_patched_blocks"]) == sorted(size["patched_blocks"]):
        greedy = " The greedy KL order (`--order kl`) patches the same blocks at this size."
    else:
        greedy = (f" The greedy KL order (`--order kl`) patches blocks "
                  f"{', '.join(map(str, size['greedy_patched_blocks']))} at this size (KL {size['greedy_kl']:.4f}).")
    return (
        f"\n\nThis size patches student blocks {blocks}, chosen by `--order search`: {how}, these bring the "
        f"model closest to the teacher, by KL(teacher || model) on {text} ({size['kl']:.4f} per token).{greedy}"
    )


def student_init_what(teacher: Checkpoint, copied: tuple[int, ...]) -> str:
    return (
        f"The initial student for [boomerang distillation]({PAPER}) of `{teacher.reference}`: teacher "
        f"layers {','.join(map(str, copied))} copied, with the teacher's embeddings, final norm and head. "
        "It is not distilled yet; train it with `layersplice distill` before interpolating."
    )


def build_card(job: Job, plan: Plan, config: dict, shard_size: int, name: str, choice: dict | None = None) -> str:
    """The card of one interpolated size, with the `build` command that writes exactly it.

    `choice` is the size's record in layersplice.json: when a search chose its blocks, the card says why."""
    alignment = job.pair.alignment
    # --blocks names the patched blocks whatever order chose them; no block at all is --keep everything.
    size = ["--blocks", ",".join(map(str, sorted(plan.patched)))] if plan.patched else ["--keep", str(alignment.n_student)]
    command = [
        "layersplice", "build", *source_arguments(job.teacher, "--teacher", "--teacher-revision"),
        *source_arguments(job.student, "--student", "--student-revision"),
        "--copied-teacher-layers", ",".join(map(str, alignment.copied)), *size,
        *output_arguments(job.cast, shard_size, name),
    ]
    what = interpolated_what(job.teacher, job.student, alignment.n_teacher, alignment.n_student)
    what += search_reason(choice, plan)
    facts = CardFacts(name, what, (job.teacher, job.student), plan, config, command)
    return render(facts, teacher_license(job.teacher))


def student_init_card(teacher: Checkpoint, alignment: Alignment, plan: Plan, config: dict, cast: str | None,
                      shard_size: int, name: str) -> str:
    """The card of an initial student, with the `init-student` command that writes exactly it."""
    command = [
        "layersplice", "init-student", *source_arguments(teacher, "--teacher", "--revision"),
        "--copied-teacher-layers", ",".join(map(str, alignment.copied)), *output_arguments(cast, shard_size, name),
    ]
    facts = CardFacts(name, student_init_what(teacher, alignment.copied), (teacher,), plan, config, command)
    return render(facts, teacher_license(teacher))
