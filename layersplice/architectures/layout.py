"""Apply a family description (or infer one) to a checkpoint's tensor names."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from layersplice.architectures import Description, find_description, load_description
from layersplice.architectures.names import NameMap, Parts
from layersplice.checkpoint.safetensors_format import TensorInfo
from layersplice.checkpoint.source import Checkpoint
from layersplice.errors import ArchitectureError

HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
EMBEDDING_HINT = re.compile(r"(^|\.)(embed_tokens|embed_in|wte|wpe|word_embeddings|position_embeddings|tok_embeddings|embeddings)(\.|$)")
HEAD_TENSOR_HINT = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")
ADD_DESCRIPTION_HINT = (
    "write a family description YAML (see layersplice/architectures/llama.yaml) and pass it with --arch FILE"
)


@dataclass(frozen=True)
class Layout:
    """A checkpoint's tensors sorted into embeddings, layers and head."""

    family: str
    inferred: bool
    prefix: str
    num_layers_key: str
    layers: tuple[tuple[TensorInfo, ...], ...]
    embeddings: tuple[TensorInfo, ...]
    head: tuple[TensorInfo, ...]
    tied: bool
    tied_head_name: str | None
    per_layer_lists: tuple[str, ...]
    per_layer_thresholds: tuple[str, ...]
    per_layer_index_lists: tuple[str, ...] = ()
    per_layer_periods: tuple[tuple[str, str], ...] = ()
    tied_alongside: tuple[tuple[str, str], ...] = ()
    # Cross-family pairing: the names_as family and the renames into its names.
    canonical_family: str = ""
    layer_names: NameMap = NameMap()
    head_names: NameMap = NameMap()

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.prefix}.{index}.{suffix}"

    def suffix(self, info: TensorInfo) -> str:
        """The part of a layer tensor's name after '<prefix>.<i>.'."""
        rest = info.name[len(self.prefix) + 1 :]
        return rest.split(".", 1)[1]

    def layer_tensors(self, index: int) -> dict[str, TensorInfo]:
        """Layer `index` by suffix, in file order."""
        return {self.suffix(t): t for t in self.layers[index]}

    @cached_property
    def own_layer_names(self) -> NameMap:
        """Layer renames into this family, spelled as this checkpoint spells its layers."""
        return self.layer_names.spelled_like(self.suffix(t) for layer in self.layers for t in layer)

    @cached_property
    def own_head_names(self) -> NameMap:
        """Head renames into this family, spelled as this checkpoint spells its head."""
        return self.head_names.spelled_like(self.head_untied())

    def head_untied(self) -> dict[str, TensorInfo]:
        """The head with the tensors the loader would tie spelled out (for an output whose
        embeddings come from another model): the tied head is the embedding matrix."""
        head = {t.name: t for t in self.head}
        if self.tied and self.tied_head_name:
            head[self.tied_head_name] = self.embeddings[0]
        return head

    def add_tied_alongside(self, head: dict[str, Parts]) -> dict[str, Parts]:
        """Spell out this family's other tied head tensors (BERT's decoder.bias) in an untied head."""
        extra = {t: head[s] for t, s in self.tied_alongside if t not in head and s in head}
        return {**head, **extra}


def layout_of(checkpoint: Checkpoint, arch_file: Path | None = None) -> Layout:
    description = load_description(arch_file) if arch_file else find_description(checkpoint.config)
    layout = _infer(checkpoint) if description is None else _describe(checkpoint, description)
    _check_hidden_size(checkpoint, layout)
    return layout


def _check_hidden_size(checkpoint: Checkpoint, layout: Layout) -> None:
    """config.json's hidden size must be the width of the word embeddings."""
    key = next((k for k in HIDDEN_SIZE_KEYS if isinstance(checkpoint.config.get(k), int)), None)
    if key is None or not layout.embeddings:
        return
    width = layout.embeddings[0].shape[-1] if layout.embeddings[0].shape else None
    if width != checkpoint.config[key]:
        raise ArchitectureError(
            f"{checkpoint.directory}: config.json says {key}={checkpoint.config[key]} but "
            f"{layout.embeddings[0].name} has shape {list(layout.embeddings[0].shape)}"
        )


def _by_file_order(tensors: list[TensorInfo]) -> tuple[TensorInfo, ...]:
    return tuple(sorted(tensors, key=lambda t: (str(t.file), t.start, t.name)))


def _split_layers(
    checkpoint: Checkpoint, prefix: str
) -> tuple[dict[int, list[TensorInfo]], list[TensorInfo]]:
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.(.+)")
    layers: dict[int, list[TensorInfo]] = defaultdict(list)
    rest: list[TensorInfo] = []
    for name, info in checkpoint.tensors.items():
        match = pattern.fullmatch(name)
        if match:
            layers[int(match.group(1))].append(info)
        else:
            rest.append(info)
    return layers, rest


def _ordered_layers(
    checkpoint: Checkpoint, layers: dict[int, list[TensorInfo]], key: str
) -> tuple[tuple[TensorInfo, ...], ...]:
    count = len(layers)
    if sorted(layers) != list(range(count)):
        missing = sorted(set(range(max(layers, default=-1) + 1)) - set(layers))
        raise ArchitectureError(f"{checkpoint.directory}: layer {missing[0]} has no tensors")
    declared = checkpoint.config.get(key)
    if declared != count:
        raise ArchitectureError(
            f"{checkpoint.directory}: config.json says {key}={declared} but the weights hold {count} layers"
        )
    return tuple(_by_file_order(layers[i]) for i in range(count))


def _describe(checkpoint: Checkpoint, description: Description) -> Layout:
    prefixes = [
        p for p in description.layer_prefixes
        if any(name.startswith(p + ".") for name in checkpoint.tensors)
    ]
    if not prefixes:
        raise ArchitectureError(
            f"{checkpoint.directory}: no tensor under {' or '.join(description.layer_prefixes)}; "
            f"the weights do not match the {description.name} description"
        )
    prefix = prefixes[0]
    layers, rest = _split_layers(checkpoint, prefix)
    embeddings = [t for t in rest if description.is_embedding(t.name)]
    head = [t for t in rest if description.is_head(t.name)]
    stray = [t.name for t in rest if t not in embeddings and t not in head]
    if stray:
        raise ArchitectureError(
            f"{checkpoint.directory}: tensor {stray[0]!r} is neither a layer, an embedding nor a "
            f"head tensor of the {description.name} description; {ADD_DESCRIPTION_HINT}"
        )
    has_tied_head = description.tied_head_when is None or any(
        re.fullmatch(description.tied_head_when, t.name) for t in head
    )
    tied = has_tied_head and _is_tied(checkpoint, description.tied_head, head, embeddings)
    return Layout(
        family=description.name,
        inferred=False,
        prefix=prefix,
        num_layers_key=description.num_layers_key,
        layers=_ordered_layers(checkpoint, layers, description.num_layers_key),
        embeddings=_tied_first(_by_file_order(embeddings), description.tied_embedding),
        head=_by_file_order(head),
        tied=tied,
        tied_head_name=description.tied_head,
        per_layer_lists=description.per_layer_lists,
        per_layer_thresholds=description.per_layer_thresholds,
        per_layer_index_lists=description.per_layer_index_lists,
        per_layer_periods=tuple(description.per_layer_periods.items()),
        tied_alongside=tuple(description.tied_alongside.items()),
        canonical_family=description.canonical_family,
        layer_names=NameMap.of(description.rename.layer, description.legacy_names),
        head_names=NameMap.of(description.rename.head, description.legacy_names),
    )


def _tied_first(embeddings: tuple[TensorInfo, ...], pattern: str | None) -> tuple[TensorInfo, ...]:
    """Put the embedding the head ties to first, keeping file order otherwise."""
    if pattern is None:
        return embeddings
    tied = [t for t in embeddings if re.fullmatch(pattern, t.name)]
    return tuple(tied + [t for t in embeddings if t not in tied])


def _is_tied(
    checkpoint: Checkpoint, head_name: str | None, head: list[TensorInfo], embeddings: list[TensorInfo]
) -> bool:
    has_head = head_name is not None and any(t.name == head_name for t in head)
    if has_head or head_name is None:
        return False
    if checkpoint.config.get("tie_word_embeddings") is False:
        raise ArchitectureError(
            f"{checkpoint.directory}: config.json sets tie_word_embeddings=false but the weights "
            f"have no {head_name}"
        )
    if not embeddings:
        raise ArchitectureError(f"{checkpoint.directory}: no embedding tensor to tie {head_name} to")
    return True


def _infer(checkpoint: Checkpoint) -> Layout:
    """Infer the layout of an undescribed decoder from '<prefix>.<i>.' tensor names."""
    model_type = checkpoint.config.get("model_type", "?")
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(checkpoint.config.get(k), int)), None)
    if key is None:
        raise ArchitectureError(
            f"{checkpoint.directory}: model_type {model_type!r} is not described and config.json "
            f"has no layer count ({', '.join(LAYER_COUNT_KEYS)}); {ADD_DESCRIPTION_HINT}"
        )
    count = checkpoint.config[key]
    candidates: dict[str, set[int]] = defaultdict(set)
    for name in checkpoint.tensors:
        match = re.match(r"(.+?)\.(\d+)\.", name)
        if match:
            candidates[match.group(1)].add(int(match.group(2)))
    fitting = [p for p, idx in candidates.items() if idx == set(range(count))]
    if len(fitting) != 1:
        found = ", ".join(f"{p} ({len(i)} indices)" for p, i in sorted(candidates.items())) or "none"
        raise ArchitectureError(
            f"{checkpoint.directory}: cannot infer the layer prefix of model_type {model_type!r} "
            f"({key}={count}; candidates: {found}); {ADD_DESCRIPTION_HINT}"
        )
    prefix = fitting[0]
    layers, rest = _split_layers(checkpoint, prefix)
    embeddings = [t for t in rest if EMBEDDING_HINT.search(t.name) and not HEAD_TENSOR_HINT.search(t.name)]
    head = [t for t in rest if t not in embeddings]
    head_tensor = next((t.name for t in head if HEAD_TENSOR_HINT.search(t.name)), None)
    tied = head_tensor is None and checkpoint.config.get("tie_word_embeddings", False) is True
    lists = tuple(
        sorted(k for k, v in checkpoint.config.items() if isinstance(v, list) and len(v) == count)
    )
    return Layout(
        family=f"{model_type} (inferred)",
        canonical_family=f"{model_type} (inferred)",
        inferred=True,
        prefix=prefix,
        num_layers_key=key,
        layers=_ordered_layers(checkpoint, layers, key),
        embeddings=_by_file_order(embeddings),
        head=_by_file_order(head),
        tied=tied,
        tied_head_name="lm_head.weight" if tied else head_tensor,
        per_layer_lists=lists,
        per_layer_thresholds=(),
    )
