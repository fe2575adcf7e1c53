"""The model card (README.md) written into every output.

Front matter the Hub reads (base models, relation, pipeline, tags, the
teacher's license), then what the model is, where every layer came from, the
command that rebuilds it and how to load it. Written with huggingface_hub's
ModelCard/ModelCardData, offline: no template download, no network.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from layersplice.checkpoint.source import CARD_FILE, Checkpoint, pinned_revision  # CARD_FILE: ours go there too
from layersplice.output.family import searched_size
from layersplice.output.source_card import read_source_card
from layersplice.planning.alignment import Alignment
from layersplice.planning.job import Job
from layersplice.planning.plan import Plan
from layersplice.units import format_params

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
    hub_owner: str | None = None  # where the output will be uploaded, as OWNER/name
    made_of: str | None = None  # how every tensor was made, when not copied from the plan's models

    @property
    def repo(self) -> str:
        """What from_pretrained loads: the Hub repo the output will be uploaded to, else its folder."""
        return f"{self.hub_owner}/{self.name}" if self.hub_owner else self.name


def shown_name(checkpoint: Checkpoint) -> str:
    """How a card names a model: its Hub repo id when it has one, else the path it was read from."""
    return checkpoint.hub_name or checkpoint.reference


def pipeline_of(config: dict) -> tuple[str | None, str]:
    """(pipeline_tag, transformers Auto class) for the model class the config names."""
    for architecture in config.get("architectures") or ():
        for suffix, tag, auto in PIPELINES:
            if architecture.endswith(suffix):
                return tag, auto
    return None, "AutoModel"


def teacher_license(teacher: Checkpoint) -> str | None:
    """The license the teacher's own card states, if it has a card that states one."""
    return read_source_card(teacher).license


def render(facts: CardFacts, license_: str | None) -> str:
    """The card's text: YAML front matter, then the body."""
    hub_ids = [c.hub_name for c in facts.base_models if c.hub_name]
    return _card(facts.config, hub_ids, "merge", license_, _body(facts))


def _card(config: dict, hub_ids: list[str], relation: str, license_: str | None, body: str,
          datasets: list[str] | None = None) -> str:
    """Front matter the Hub reads, then `body`."""
    from huggingface_hub import ModelCard, ModelCardData

    pipeline_tag, _ = pipeline_of(config)
    data = ModelCardData(
        base_model=hub_ids or None,
        datasets=datasets or None,
        library_name="transformers",
        license=license_,
        pipeline_tag=pipeline_tag,
        tags=list(TAGS),
        # The relation only means something next to base_model.
        **({"base_model_relation": relation} if hub_ids else {}),
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _body(facts: CardFacts) -> str:
    plan = facts.plan
    rows = "\n".join(
        f"| {layer.index} | {facts.made_of or layer.model} | {layer.source_layer} | {layer.block} |"
        for layer in plan.layers
    )
    sources = f"Every tensor is {facts.made_of}" if facts.made_of else (
        f"Embeddings from the {plan.embeddings_from}; final norm and head from the {plan.head_from}")
    return f"""# {facts.name}

{facts.what}

- Layers: {plan.n_layers}
- Parameters: {format_params(plan.params)} ({plan.params:,})
- {sources}

## Where every layer came from

| output layer | from | source layer | student block |
|---:|---|---:|---:|
{rows}

## Rebuild it

```bash
{shlex.join(facts.command)}
```

{_usage(facts.name, facts.repo, facts.hub_owner is not None, facts.config)}"""


def _usage(name: str, repo: str, uploaded: bool, config: dict) -> str:
    """The end of every card: how to check the files and how to load the model.

    `repo` is what from_pretrained loads: the Hub repo the output will be
    uploaded to (`uploaded`), else its folder `name`."""
    _, auto = pipeline_of(config)
    quoted = shlex.quote(name)
    download = f"hf download {repo} --local-dir {quoted}\n" if uploaded else ""
    return f"""`layersplice verify` re-checks every file against the sealed `layersplice.json`:

```bash
{download}layersplice verify {quoted}
```

## Use it

```python
from transformers import {auto}, AutoTokenizer

model = {auto}.from_pretrained("{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```
"""


def source_arguments(checkpoint: Checkpoint, option: str, revision_option: str) -> list[str]:
    """`--teacher REF [--teacher-revision R]`: a model as the command line names it.

    A Hub model is pinned to the commit that was read (the name of its
    snapshot folder in the cache), so the command rebuilds these very bytes
    after the repository moves on. A local copy declared to be a Hub repo is
    named by that repo (and the revision declared for it)."""
    arguments = [option, shown_name(checkpoint)]
    revision = pinned_revision(checkpoint.reference, checkpoint.directory, checkpoint.revision)
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
        f"A size between the teacher `{shown_name(teacher)}` ({n_teacher} layers) and its student "
        f"`{shown_name(student)}` ({n_student} layers), made by "
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
        f"The initial student for [boomerang distillation]({PAPER}) of `{shown_name(teacher)}`: teacher "
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
    facts = CardFacts(name, what, (job.teacher, job.student), plan, config, command, job.hub_owner)
    return render(facts, teacher_license(job.teacher))


def student_init_card(teacher: Checkpoint, alignment: Alignment, plan: Plan, config: dict, cast: str | None,
                      shard_size: int, name: str, hub_owner: str | None = None) -> str:
    """The card of an initial student, with the `init-student` command that writes exactly it."""
    command = [
        "layersplice", "init-student", *source_arguments(teacher, "--teacher", "--teacher-revision"),
        "--copied-teacher-layers", ",".join(map(str, alignment.copied)), *output_arguments(cast, shard_size, name),
    ]
    facts = CardFacts(name, student_init_what(teacher, alignment.copied), (teacher,), plan, config, command, hub_owner)
    return render(facts, teacher_license(teacher))


@dataclass(frozen=True)
class DistilledFacts:
    """What the card of a distilled student says, gathered by distill after the run."""

    name: str  # the output directory's name
    teacher: Checkpoint
    student: Checkpoint  # the initial student it was trained from
    alignment: Alignment
    config: dict
    params: int
    command: list[str] | None  # the distill command of the run; None: run through the Python API
    facts: tuple[str, ...]  # one line each: the data, the training, the final losses
    datasets: tuple[str, ...] = ()  # Hub dataset ids it was trained on
    hub_owner: str | None = None  # where it will be uploaded: its commands name it OWNER/name

    @property
    def repo(self) -> str:
        return f"{self.hub_owner}/{self.name}" if self.hub_owner else self.name


def distilled_card(facts: DistilledFacts) -> str:
    """The card of a distilled student: the teacher as base model, what it was trained on, how to build sizes.

    The Hub's relations are adapter, merge, quantized and finetune (no
    distillation): the student's weights are the teacher's own layers,
    trained further, which is a finetune of the teacher."""
    alignment = facts.alignment
    teacher = source_arguments(facts.teacher, "--teacher", "--teacher-revision")
    pair = shlex.join([*teacher, "--student", facts.repo])
    lines = "\n".join(f"- {line}" for line in facts.facts)
    how = (f"```bash\n{shlex.join(facts.command)}\n```" if facts.command
           else "Through the Python API (`layersplice.distill.loop.distill`), not the command line.")
    body = f"""# {facts.name}

The student of `{shown_name(facts.teacher)}` ({alignment.n_teacher} layers) trained by
[boomerang distillation]({PAPER}) from the initial student `{shown_name(facts.student)}` (teacher layers
{','.join(map(str, alignment.copied))}, copied by `layersplice init-student`), with cross-entropy, KL to
the teacher's logits and the cosine between its hidden states and the teacher's at the end of each
block. Every size between it and the teacher can be built from the pair with no further training.

- Layers: {alignment.n_student}
- Parameters: {format_params(facts.params)} ({facts.params:,})
{lines}

## Build sizes from it

```bash
layersplice plan {pair}
layersplice build {pair} --all --out {shlex.quote(facts.name + '-sizes')}
```

## How it was trained

{how}

Every setting of the run, and the sources it read, are in the sealed `layersplice.json`; the loss at
every step is in `metrics.jsonl`.

{_usage(facts.name, facts.repo, facts.hub_owner is not None, facts.config)}"""
    hub_ids = [facts.teacher.hub_name] if facts.teacher.hub_name else []
    return _card(facts.config, hub_ids, "finetune", teacher_license(facts.teacher), body, list(facts.datasets))
