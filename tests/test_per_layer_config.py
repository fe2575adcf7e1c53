"""A built config's per-layer lists follow its layers (METHOD.md §5).

For models with mixed sliding/full attention, each output layer's layer_types
entry must be the entry of the layer it came from, teacher or student, and
transformers must load the result without a word of complaint.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
from collections.abc import Iterator

import pytest
import torch
import transformers
from conftest import ALIGNMENTS, FULL, SLIDING
from splice_reference import (
    kept_blocks_patched,
    layer_sources,
    load_causal_lm,
    logits,
    splice,
)
from transformers import AutoConfig

ARCHS = ["qwen2", "qwen3", "gemma3"]
N_STUDENT = 4
# as-copied: the student's layer types are those of the teacher layers it copies.
# flipped: each student layer has the other type, so a wrong source shows.
# legacy: no layer_types in either config.json; transformers derives them.
VARIANTS = {
    "as-copied": {},
    "flipped": {"flip_student_types": True},
    "legacy": {"legacy": True},
}
CHOICES = {
    **{
        f"keep{keep}-{order}": (("--keep", str(keep), "--order", order), kept_blocks_patched(keep, N_STUDENT, order))
        for order, keep in itertools.product(("last", "first"), range(1, N_STUDENT))
    },
    "blocks0,3": (("--blocks", "0,3"), {0, 3}),
    "blocks1,2": (("--blocks", "1,2"), {1, 2}),
}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def complaints() -> Iterator[list[str]]:
    """Python warnings and transformers log records at WARNING or above."""
    # warning_once remembers what it has said; a repeat must be heard again.
    transformers.utils.logging.warning_once.cache_clear()
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    messages: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        logger.removeHandler(handler)
    messages.extend(handler.messages)


def _load_quietly(directory):
    with complaints() as messages:
        config = AutoConfig.from_pretrained(directory)
        model = load_causal_lm(directory)
    return config, model, messages


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_sources_load_quietly_with_mixed_layer_types(checkpoints, arch, variant):
    """The premise of the tests below: the inputs themselves load without complaint
    and mix both attention types."""
    pair = checkpoints(arch, ALIGNMENTS["1-2-2"], **VARIANTS[variant])
    for directory in (pair.teacher_dir, pair.student_dir):
        config, _, messages = _load_quietly(directory)
        assert messages == []
        assert set(config.layer_types) == {FULL, SLIDING}


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_each_output_layer_keeps_the_attention_type_of_its_source_layer(
    checkpoints, build, input_ids, tmp_path, arch, variant, alignment, choice
):
    pair = checkpoints(arch, ALIGNMENTS[alignment], **VARIANTS[variant])
    options, patched = CHOICES[choice]
    config, built, messages = _load_quietly(build(pair, tmp_path / "out", *options))
    assert messages == [], "loading the built model complained"

    sources = layer_sources(pair.teacher, pair.student, pair.copied, patched)
    assert config.num_hidden_layers == len(sources)
    assert len(config.layer_types) == config.num_hidden_layers
    assert config.layer_types == [model.config.layer_types[i] for model, i in sources]
    windows = [layer.self_attn.sliding_window for layer in built.model.layers]
    assert windows == [model.model.layers[i].self_attn.sliding_window for model, i in sources]
    expected = splice(pair.teacher, pair.student, pair.copied, patched)
    assert torch.equal(logits(built, input_ids), logits(expected, input_ids))


# With legacy configs the 1-2-2 teacher is F,F,F,S,S,S and its student F,F,F,S;
# every choice but keep2-first (F,F,F,S,F,S) gives full layers then sliding ones.
THRESHOLD_CHOICES = [choice for choice in CHOICES if choice != "keep2-first"]


@pytest.mark.parametrize("choice", THRESHOLD_CHOICES)
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_max_window_layers_gives_the_same_layout_as_layer_types(
    checkpoints, build, tmp_path, arch, choice
):
    """Readers that ignore layer_types derive Qwen's layout from max_window_layers
    (full below it, sliding from it on); the rewritten threshold must agree."""
    pair = checkpoints(arch, ALIGNMENTS["1-2-2"], legacy=True)
    options, _ = CHOICES[choice]
    config = AutoConfig.from_pretrained(build(pair, tmp_path / "out", *options))
    n_full = config.layer_types.count(FULL)
    assert config.layer_types == [FULL] * n_full + [SLIDING] * (config.num_hidden_layers - n_full)
    assert config.max_window_layers == n_full
