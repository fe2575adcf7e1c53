"""init-student streams the kept teacher layers into a loadable student."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from conftest import ALIGNMENTS
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from layersplice.cli.main import cli


def _tensors(directory):
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_init_student_equals_kept_teacher_layers_and_loads(tmp_path, checkpoints):
    pair = checkpoints("qwen3", ALIGNMENTS["1-2-2"])
    out = tmp_path / "student"
    result = CliRunner().invoke(cli, ["init-student", "--teacher", str(pair.teacher_dir), "--out", str(out),
                                      "--first", "1", "--every", "2", "--last", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "student_config.json").read_text()) == {
        "pruned_teacher_layers": [1, 3], "copied_teacher_layers": [0, 2, 4, 5]}
    teacher, student = _tensors(pair.teacher_dir), _tensors(out)
    for name, tensor in student.items():
        if ".layers." in name:
            index = int(name.split(".")[2])
            source = name.replace(f".layers.{index}.", f".layers.{(0, 2, 4, 5)[index]}.")
        else:
            source = name
        assert torch.equal(tensor, teacher[source]), name
    expected = {n for n in teacher if ".layers." not in n or int(n.split(".")[2]) in (0, 2, 4, 5)}
    assert len(student) == len(expected)
    config = json.loads((out / "config.json").read_text())
    teacher_types = json.loads((pair.teacher_dir / "config.json").read_text())["layer_types"]
    assert config["num_hidden_layers"] == 4
    assert config["layer_types"] == [teacher_types[i] for i in (0, 2, 4, 5)]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 4


def test_init_student_defaults_to_the_reference_rule(tmp_path, checkpoints):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    out = tmp_path / "student"
    result = CliRunner().invoke(cli, ["init-student", "--teacher", str(pair.teacher_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "student_config.json").read_text())["copied_teacher_layers"] == [0, 2, 4, 5]
