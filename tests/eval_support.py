"""Text and a tokenizer for evaluating the tiny random pairs of conftest.py offline.

The text is docstrings of standard-library modules (layersplice.evaluation.stdlib_text);
the tokenizer is a small BPE trained on it with the pairs' vocabulary size.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import VOCAB

from layersplice.evaluation.stdlib_text import HELD_OUT_MODULES, module_docstrings, write_documents

TEXT_MODULES = HELD_OUT_MODULES[:4]


def save_tokenizer(directory: Path, vocab_size: int, documents: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"], limit_alphabet=vocab_size // 2)
    tokenizer.train_from_iterator(documents, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")
    wrapped.save_pretrained(directory)


def with_tokenizer(pair_dirs: tuple[Path, Path], root: Path, vocab_size: int) -> tuple[Path, Path]:
    """Copies of a teacher and a student directory that carry the same tokenizer."""
    documents = [module_docstrings(name) for name in TEXT_MODULES]
    copies = []
    for directory, name in zip(pair_dirs, ("teacher", "student")):
        copy = root / name
        if not copy.exists():
            shutil.copytree(directory, copy)
            save_tokenizer(copy, vocab_size, documents)
        copies.append(copy)
    return copies[0], copies[1]


@dataclass(frozen=True)
class EvalPair:
    """A random teacher/student pair that carries a tokenizer, and held-out text for it."""

    teacher: Path
    student: Path
    copied: tuple[int, ...]
    text: Path

    def args(self) -> list[str]:
        return ["--teacher", str(self.teacher), "--student", str(self.student)]


@pytest.fixture(scope="session")
def eval_pair(checkpoints, tmp_path_factory):
    """(arch, copied) -> EvalPair, cached for the session."""
    made: dict[tuple, EvalPair] = {}

    def get(arch: str = "llama", copied: tuple[int, ...] = (0, 2, 4, 5)) -> EvalPair:
        if (arch, copied) not in made:
            pair = checkpoints(arch, copied)
            root = tmp_path_factory.mktemp(f"eval-{arch}")
            teacher, student = with_tokenizer((pair.teacher_dir, pair.student_dir), root, VOCAB)
            text = write_documents(root / "held-out.jsonl", TEXT_MODULES)
            made[arch, copied] = EvalPair(teacher, student, copied, text)
        return made[arch, copied]

    return get


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The test models are tiny: one thread is fastest, and more only spin on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

