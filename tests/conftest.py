"""Tiny random teachers and students of several families, saved once per session.

Teacher and student get different random weights, so every choice of patched
blocks gives a different model and exact logit comparisons can tell them apart.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from splice_reference import load_causal_lm
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

# The test models are tiny: a second thread buys nothing, and on a busy 2-core
# machine OpenMP workers waiting for each other make every matmul ~50x slower.
torch.set_num_threads(1)

VOCAB = 128
N_TEACHER = 6
WINDOW = 4
SEQ_LEN = 16  # longer than WINDOW, so sliding and full attention differ

FULL, SLIDING = "full_attention", "sliding_attention"
TEACHER_LAYER_TYPES = (FULL, SLIDING, SLIDING, FULL, SLIDING, FULL)

# Copied teacher layers for a 6-layer teacher (METHOD.md §2, worked by hand).
ALIGNMENTS = {
    # first/every/last 1/2/2: blocks [0,2), [2,4), then one-layer blocks 4 and 5.
    "1-2-2": (0, 2, 4, 5),
    # 2/2/1: one-layer block 0, blocks [1,3), [3,5), one-layer block 5.
    "2-2-1": (0, 1, 3, 5),
}

_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=N_TEACHER,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
)
_WINDOWED = dict(_SIZES, sliding_window=WINDOW, layer_types=list(TEACHER_LAYER_TYPES))

ARCHITECTURES: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(**_SIZES, tie_word_embeddings=False),
    "llama-tied": lambda: LlamaConfig(**_SIZES, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_SIZES, sliding_window=WINDOW, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**_WINDOWED, use_sliding_window=True, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(
        **_WINDOWED, head_dim=8, use_sliding_window=True, tie_word_embeddings=True
    ),
    "gemma3": lambda: Gemma3TextConfig(**_WINDOWED, head_dim=8, tie_word_embeddings=True),
    "gpt_neox": lambda: GPTNeoXConfig(
        **{k: v for k, v in _SIZES.items() if k != "num_key_value_heads"}, tie_word_embeddings=False
    ),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=N_TEACHER, n_head=4, n_positions=64,
        initializer_range=0.1, tie_word_embeddings=True,
    ),
}

# Configs as older checkpoints on the Hub write them: no layer_types, the layout
# derived by transformers from another key.
LEGACY_CONFIG_EDITS: dict[str, dict] = {
    "qwen2": {"max_window_layers": 3},
    "qwen3": {"max_window_layers": 3},
    "gemma3": {"sliding_window_pattern": 3},
}
_LEGACY_DROPPED_KEYS = ("layer_types", "_sliding_window_pattern")


@dataclass(frozen=True)
class Pair:
    """A saved teacher and student, and the same checkpoints loaded as modules."""

    teacher_dir: Path
    student_dir: Path
    copied: tuple[int, ...]
    teacher: PreTrainedModel
    student: PreTrainedModel


def _save_random(config: PretrainedConfig, seed: int, directory: Path) -> None:
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def _make_legacy(directory: Path, arch: str) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key in _LEGACY_DROPPED_KEYS:
        config.pop(key, None)
    config.update(LEGACY_CONFIG_EDITS[arch])
    path.write_text(json.dumps(config, indent=2))


def _student_config(
    teacher_config: PretrainedConfig, copied: tuple[int, ...], flip_layer_types: bool
) -> PretrainedConfig:
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = len(copied)
    if getattr(config, "layer_types", None) is not None:
        types = [TEACHER_LAYER_TYPES[i] for i in copied]
        if flip_layer_types:
            types = [FULL if t == SLIDING else SLIDING for t in types]
        config.layer_types = types
    return config


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Callable[..., Pair]:
    """Get (and cache) a teacher/student pair.

    arch: a key of ARCHITECTURES. copied: the student's copied teacher layers.
    student_config: write student_config.json into the student directory.
    flip_student_types: give every student layer the other attention type than
    the teacher layer it was copied from, so the tests can tell which model an
    output layer's entry was taken from. legacy: configs without layer_types.
    """
    root = tmp_path_factory.mktemp("checkpoints")
    dirs: dict[tuple, Path] = {}
    models: dict[Path, PreTrainedModel] = {}

    def model(directory: Path) -> PreTrainedModel:
        if directory not in models:
            models[directory] = load_causal_lm(directory)
        return models[directory]

    def teacher_dir(arch: str, legacy: bool) -> Path:
        key = ("teacher", arch, legacy)
        if key not in dirs:
            directory = root / f"teacher-{arch}{'-legacy' if legacy else ''}"
            if legacy:
                shutil.copytree(teacher_dir(arch, False), directory)
                _make_legacy(directory, arch)
            else:
                _save_random(ARCHITECTURES[arch](), 0, directory)
            dirs[key] = directory
        return dirs[key]

    def get(
        arch: str,
        copied: tuple[int, ...],
        *,
        student_config: bool = True,
        flip_student_types: bool = False,
        legacy: bool = False,
    ) -> Pair:
        key = (arch, copied, student_config, flip_student_types, legacy)
        if key not in dirs:
            name = "-".join(str(part) for part in key).replace(",", "_").replace(" ", "")
            directory = root / f"student-{name}"
            config = _student_config(ARCHITECTURES[arch](), copied, flip_student_types)
            _save_random(config, 1 + zlib.crc32(repr(key[:2]).encode()), directory)
            if student_config:
                pruned = [i for i in range(N_TEACHER) if i not in copied]
                (directory / "student_config.json").write_text(
                    json.dumps({"pruned_teacher_layers": pruned, "copied_teacher_layers": list(copied)})
                )
            if legacy:
                _make_legacy(directory, arch)
            dirs[key] = directory
        teacher = teacher_dir(arch, legacy)
        return Pair(teacher, dirs[key], copied, model(teacher), model(dirs[key]))

    return get


@pytest.fixture(scope="session")
def build() -> Callable[..., Path]:
    """Run `layersplice build` in-process for a pair; fail the test with the CLI's output."""

    def run(pair: Pair, out: Path, *options: str) -> Path:
        from layersplice.cli.main import cli

        args = ["build", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir),
                "--out", str(out), *options]
        result = CliRunner().invoke(cli, args)
        if result.exit_code != 0:
            trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
            pytest.fail(
                f"layersplice {' '.join(args)} exited {result.exit_code}\n{result.output}\n{trace}"
            )
        return out

    return run


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: streams a checkpoint of hundreds of MB (about a minute)")


# Property tests: seconds by default; `--hypothesis-profile=fuzz` for the long run
# (FUZZ_EXAMPLES examples per test, 100,000 unless set).
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("default", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "100000")), deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile("default")


@pytest.fixture(scope="session")
def family_pair(tmp_path_factory) -> Callable[..., Pair]:
    """Pairs of the families beyond the core decoders, and across two families (family_models.py)."""
    from family_models import family_pairs

    return family_pairs(tmp_path_factory.mktemp("families"), Pair)
