"""README.md's "Your own model, start to finish", run as written on a teacher that is not the fixture.

The commands are read from the README itself, so the two cannot drift. The
teacher is a tiny Qwen3 built here from transformers' config class and saved
with a tokenizer; its variant is the same model with every weight nudged (a
stand-in for post-training). The `hf` lines are not run: they download from
or upload to the Hub, and tests have no network. What they would leave (the
two model folders) is made here instead, and the texts are stdlib docstrings.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from layersplice.evaluation.stdlib_text import CALIBRATION_MODULES, HELD_OUT_MODULES, write_documents

REPOSITORY = Path(__file__).resolve().parent.parent
README = REPOSITORY / "README.md"
SECTION = "## Your own model, start to finish"
NEEDS_NETWORK = ("hf download", "hf upload", "for size in")  # the Hub, both ways
TEACHER_ID, VARIANT_ID = "Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-0.6B"


def walkthrough_commands() -> list[str]:
    """Every command of the README section's bash blocks, continuation lines joined, comments dropped."""
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _tiny_qwen3(directory: Path, tokenizer, nudge: float | None = None) -> None:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    model = Qwen3ForCausalLM(config)
    if nudge is not None:  # the "post-trained" variant: every weight moved a little
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(nudge * torch.randn_like(parameter))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> Path:
    """A folder after every runnable command of the walk-through, run in order."""
    work = tmp_path_factory.mktemp("walkthrough")
    tokenizer = AutoTokenizer.from_pretrained(REPOSITORY / "fixtures" / "tiny-teacher")
    _tiny_qwen3(work / "teacher", tokenizer)
    _tiny_qwen3(work / "teacher-instruct", tokenizer, nudge=0.01)
    write_documents(work / "train.jsonl", CALIBRATION_MODULES)
    write_documents(work / "held-out.jsonl", HELD_OUT_MODULES)
    bin_dir = str(Path(sys.executable).parent)  # where the layersplice entry point is installed
    env = dict(os.environ, PATH=os.pathsep.join([bin_dir, os.environ["PATH"]]), HF_HUB_OFFLINE="1")
    for command in walkthrough_commands():
        if command.startswith(NEEDS_NETWORK):
            continue
        assert command.startswith("layersplice "), f"a README command the test does not know how to run: {command}"
        result = subprocess.run(["bash", "-e", "-c", command], cwd=work, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        assert not result.stderr.startswith("\n"), f"{command}: stderr starts with an empty line"
    return work


def test_the_walkthrough_runs_every_layersplice_command_and_skips_only_the_hub():
    commands = walkthrough_commands()
    skipped = [c for c in commands if c.startswith(NEEDS_NETWORK)]
    assert skipped and all(c.startswith("hf ") or "hf upload" in c for c in skipped)
    run = [shlex.split(c)[1] for c in commands if c not in skipped]
    assert {"inspect", "init-student", "distill", "plan", "build", "verify", "eval", "transfer"} <= set(run)


def test_the_walkthrough_leaves_a_published_family_with_hub_lineage(walked):
    sizes = walked / "sizes"
    manifest = json.loads((sizes / "manifest.json").read_text())
    assert [entry["directory"] for entry in manifest["sizes"]] == [
        f"qwen3-student-{entry['layers']}L" for entry in manifest["sizes"]]  # named for --student-id
    for entry in manifest["sizes"]:
        card = ModelCard.load(sizes / entry["directory"] / "README.md")
        assert card.data.base_model == [TEACHER_ID, "you/qwen3-student"]
        assert f'from_pretrained("you/{entry["directory"]}")' in card.text
        assert [r.dataset_name for r in card.data.eval_results] == ["my held-out text"]
        assert "teacher" not in card.text.split("## Rebuild it")[1].split("```")[1].split()  # no local path
    transferred = ModelCard.load(walked / "student-instruct" / "README.md")
    assert transferred.data.base_model == [VARIANT_ID, "you/qwen3-student", TEACHER_ID]
    instruct_sizes = json.loads((walked / "sizes-instruct" / "manifest.json").read_text())["sizes"]
    assert {entry["layers"] for entry in instruct_sizes} == {entry["layers"] for entry in manifest["sizes"]}
