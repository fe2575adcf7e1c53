"""A decoder that no description covers builds through inference from tensor names."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import ALIGNMENTS
from safetensors_files import tensors_as_bytes

from layersplice.architectures import load_description
from layersplice.cli.main import cli


def _rename_family(src, dst, model_type):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = model_type
    config["architectures"] = ["MyDecoderForCausalLM"]
    (dst / "config.json").write_text(json.dumps(config))


def _undescribed_pair(tmp_path, checkpoints):
    """The qwen3 fixture pair under a model_type no description covers."""
    pair = checkpoints("qwen3", ALIGNMENTS["1-2-2"])
    teacher, student = tmp_path / "t", tmp_path / "s"
    _rename_family(pair.teacher_dir, teacher, "my_decoder")
    _rename_family(pair.student_dir, student, "my_decoder")
    return pair, teacher, student


def test_unknown_family_builds_like_the_described_one(tmp_path, checkpoints):
    pair, teacher, student = _undescribed_pair(tmp_path, checkpoints)
    runner = CliRunner()
    described, inferred = tmp_path / "described", tmp_path / "inferred"
    for t, s, out in ((pair.teacher_dir, pair.student_dir, described), (teacher, student, inferred)):
        result = runner.invoke(cli, ["build", "--teacher", str(t), "--student", str(s), "--keep", "1", "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert "layer_types" in result.output  # the CLI says which lists it treated as per-layer
    assert tensors_as_bytes(inferred) == tensors_as_bytes(described)
    a = json.loads((described / "config.json").read_text())
    b = json.loads((inferred / "config.json").read_text())
    assert b["layer_types"] == a["layer_types"]
    assert b["num_hidden_layers"] == a["num_hidden_layers"] == 5

    info = runner.invoke(cli, ["inspect", str(teacher), "--json"])
    assert json.loads(info.output)["inferred"] is True


def test_ambiguous_inference_explains_how_to_add_a_description(tmp_path, checkpoints):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    teacher = tmp_path / "t"
    _rename_family(pair.teacher_dir, teacher, "my_decoder")
    config = json.loads((teacher / "config.json").read_text())
    config["num_hidden_layers"] = 7  # no prefix holds 7 layers
    (teacher / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["inspect", str(teacher)])
    assert result.exit_code == 2
    assert "cannot infer" in result.output and "--arch" in result.output


@pytest.mark.parametrize("key", ["num_hidden_layers"])
def test_described_family_with_wrong_layer_count_is_refused(tmp_path, checkpoints, key):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    teacher = tmp_path / "t"
    shutil.copytree(pair.teacher_dir, teacher)
    config = json.loads((teacher / "config.json").read_text())
    config[key] = 9
    (teacher / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["inspect", str(teacher)])
    assert result.exit_code == 2 and "says num_hidden_layers=9" in result.output


def test_describe_drafts_a_description_that_builds_the_inferred_family(tmp_path, checkpoints):
    """The draft validates against the schema and, passed with --arch, builds what inference builds."""
    _, teacher, student = _undescribed_pair(tmp_path, checkpoints)
    runner = CliRunner()
    draft = tmp_path / "my_decoder.yaml"
    result = runner.invoke(cli, ["describe", str(teacher), "--out", str(draft)])
    assert result.exit_code == 0, result.output
    description = load_description(draft)
    assert description.name == "my_decoder" and description.layer_prefixes == ("model.layers",)
    assert description.per_layer_lists == ("layer_types",)
    assert description.tied_head == "lm_head.weight"  # qwen3 fixture ties its head

    outs = {}
    for name, extra in (("inferred", []), ("described", ["--arch", str(draft)])):
        outs[name] = tmp_path / name
        args = ["build", "--teacher", str(teacher), "--student", str(student), "--keep", "1", "--out", str(outs[name]), *extra]
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
    assert tensors_as_bytes(outs["described"]) == tensors_as_bytes(outs["inferred"])
    info = json.loads(runner.invoke(cli, ["inspect", str(teacher), "--arch", str(draft), "--json"]).output)
    assert info["inferred"] is False and info["family"] == "my_decoder"


def test_describe_prints_the_built_in_description_of_a_described_family(checkpoints):
    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    result = CliRunner().invoke(cli, ["describe", str(pair.teacher_dir)])
    assert result.exit_code == 0, result.output
    assert "llama.yaml" in result.output and "num_layers_key: num_hidden_layers" in result.output
