"""The recipes of the five published boomerang pairs give the published students.

For each pair: the recipe's alignment rule, applied to the teacher's layer
count, must give the published student's layer count, and a student of that
many layers, counted by transformers from the teacher's architecture, must
have the size in the student's published name (2.3B, 4.9B, ...).

Sources of the numbers:
* Teacher shapes (layers, hidden, intermediate, heads, vocabulary, tied
  embeddings): each teacher's config.json on the Hugging Face Hub
  (Qwen/Qwen3-4B-Base, Qwen/Qwen3-8B-Base, EleutherAI/pythia-2.8b,
  EleutherAI/pythia-6.9b, meta-llama/Llama-3.2-3B), restated here.
* Student layer counts 19 (Qwen3-4B), 17 (Pythia-2.8B) and 15 (Llama-3.2-3B)
  and their kept layers: METHOD.md §2 (the paper's reference code).
  Qwen3-8B (36 layers) and Pythia-6.9B (32 layers) use the same 1/2/2 rule as
  their smaller siblings, so 19 and 17 layers, worked by hand below.
* Published sizes: the student repositories' names (Harvard-DCML/boomerang-*).
* Patch order: METHOD.md §4 (the reference patches Qwen and Pythia from the
  last block, Llama from the first).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen3Config

from layersplice.planning.alignment import copied_from_rule
from layersplice.planning.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


TEACHER_LAYERS = {"Qwen/Qwen3-4B-Base": 36, "Qwen/Qwen3-8B-Base": 36, "EleutherAI/pythia-2.8b": 32,
                  "EleutherAI/pythia-6.9b": 32, "meta-llama/Llama-3.2-3B": 28}


def _qwen3(hidden, intermediate, tied):
    return lambda layers: Qwen3Config(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=tied)


def _pythia(hidden, intermediate, vocab):
    return lambda layers: GPTNeoXConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=32,
        vocab_size=vocab, tie_word_embeddings=False)


def _llama_3b(layers):
    return LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=24,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True)


# recipe file, teacher, student, config(layers) of the teacher's architecture, order, student layers, kept layers
PAIRS = [
    ("qwen3.yaml", "Qwen/Qwen3-4B-Base", "Harvard-DCML/boomerang-qwen3-2.3B", _qwen3(2560, 9728, True), "last", 19,
     (*range(0, 35, 2), 35)),
    ("qwen3-8b.yaml", "Qwen/Qwen3-8B-Base", "Harvard-DCML/boomerang-qwen3-4.9B", _qwen3(4096, 12288, False), "last",
     19, (*range(0, 35, 2), 35)),  # by hand: blocks [0,2) .. [32,34), then 34 and 35
    ("pythia.yaml", "EleutherAI/pythia-2.8b", "Harvard-DCML/boomerang-pythia-1.6B", _pythia(2560, 10240, 50304),
     "last", 17, (*range(0, 31, 2), 31)),
    ("pythia-6.9b.yaml", "EleutherAI/pythia-6.9b", "Harvard-DCML/boomerang-pythia-3.8B", _pythia(4096, 16384, 50432),
     "last", 17, (*range(0, 31, 2), 31)),  # by hand: blocks [0,2) .. [28,30), then 30 and 31
    ("llama3.yaml", "meta-llama/Llama-3.2-3B", "Harvard-DCML/boomerang-llama-3.2-1.9B", _llama_3b, "first", 15,
     (0, *range(1, 26, 2), 27)),
]
# The teachers' own sizes, from their names, check the restated shapes.
TEACHER_BILLIONS = {"Qwen/Qwen3-4B-Base": 4.0, "Qwen/Qwen3-8B-Base": 8.2, "EleutherAI/pythia-2.8b": 2.8,
                    "EleutherAI/pythia-6.9b": 6.9, "meta-llama/Llama-3.2-3B": 3.2}


def _parameters(config) -> int:
    """transformers' own count of a model with this config (on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _published_billions(repo: str) -> float:
    return float(repo.rsplit("-", 1)[1].removesuffix("B"))


@pytest.mark.parametrize("recipe_file, teacher, student, config, order, n_student, kept", PAIRS,
                         ids=[p[0] for p in PAIRS])
def test_recipe_alignment_gives_the_published_student(recipe_file, teacher, student, config, order, n_student, kept):
    recipe, _ = load_recipe(RECIPES / recipe_file)
    assert (recipe.teacher, recipe.student, recipe.order) == (teacher, student, order)
    rule = (recipe.alignment.first, recipe.alignment.every, recipe.alignment.last)
    copied = copied_from_rule(TEACHER_LAYERS[teacher], *rule)
    assert copied == kept and len(copied) == n_student
    assert round(_parameters(config(TEACHER_LAYERS[teacher])) / 1e9, 1) == TEACHER_BILLIONS[teacher]
    assert round(_parameters(config(n_student)) / 1e9, 1) == _published_billions(student)


def test_every_published_pair_has_a_recipe():
    published = {load_recipe(path)[0].student for path in RECIPES.glob("*.yaml")}
    assert {pair[2] for pair in PAIRS} <= published
