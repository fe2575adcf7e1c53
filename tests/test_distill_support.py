"""Tiny models, tokenizer and text shared by the distill tests (this module has no tests)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from layersplice.cli.main import cli

WORDS = (
    "the teacher student layer block copy keeps cuts aligns hidden state loss cosine "
    "model small large train step data token pack window seed shard rank batch"
).split()


def sentences(count: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text: `count` short documents of known words."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))).capitalize() + "."
        for _ in range(count)
    ]


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process on `sentences`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences(200), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def tiny_config(vocab_size: int, layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
    )


def make_pair(root: Path, teacher_layers: int = 6, seed: int = 0) -> tuple[Path, Path]:
    """A random tiny Llama teacher with a tokenizer, and its 1/2/2 student from init-student."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    teacher_dir = root / "teacher"
    LlamaForCausalLM(tiny_config(len(tokenizer), teacher_layers)).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    student_dir = root / "student"
    args = ["init-student", "--teacher", str(teacher_dir), "--out", str(student_dir),
            "--first", "1", "--every", "2", "--last", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return teacher_dir, student_dir


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: text}) + "\n" for text in texts))
    return path


def pair_with_text(root: Path) -> tuple[Path, Path, Path]:
    """make_pair's teacher and student, and a .jsonl of 300 documents."""
    teacher, student = make_pair(root)
    return teacher, student, write_jsonl(root / "data.jsonl", sentences(300, seed=1))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on 2 cores run faster, and as torchrun's workers do, on one thread
    (autouse in each module that imports it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
