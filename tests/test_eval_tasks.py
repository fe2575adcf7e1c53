"""eval --tasks: lm-evaluation-harness on every size, offline, with a multiple-choice
task defined here on local JSON-lines data."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from eval_support import eval_pair, one_torch_thread  # noqa: F401 - fixtures
from PIL import Image

from layersplice.cli.main import cli

pytest.importorskip("lm_eval", reason="the optional extra: pip install 'layersplice[eval]'")
pytest.importorskip("accelerate", reason="the optional extra: pip install 'layersplice[eval]'")

WORDS = (" string", " tuple", " list", " module")
TASK_YAML = """\
task: tiny_docstring_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"question": f"Return a new{WORDS[i % 4]} of the", "choices": list(WORDS), "answer": i % 4} for i in range(8)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_docstring_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "mc.jsonl"))
    return tasks


def test_tasks_run_on_every_size_and_give_a_table_json_csv_and_plot(eval_pair, task_dir, tmp_path):
    pair = eval_pair("llama")
    out = tmp_path / "out"
    args = ["eval", *pair.args(), "--tasks", "tiny_docstring_mc", "--include-path", str(task_dir),
            "--batch-size", "4", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "tiny_docstring_mc" in result.stdout
    report = json.loads((out / "tasks.json").read_text())
    assert [s["role"] for s in report["sizes"]] == ["student", "interpolated", "teacher"]
    for size in report["sizes"]:
        assert 0 <= size["scores"]["tiny_docstring_mc"]["acc"] <= 1
        assert set(size["scores"]["tiny_docstring_mc"]) == {"acc"}
    assert (out / "tasks.csv").read_text().splitlines()[0] == "role,layers,parameters,non_embedding_parameters,keep,tiny_docstring_mc/acc"
    with Image.open(out / "tasks.png") as image:
        assert image.format == "PNG" and image.size == (800, 500)


def test_an_unknown_task_is_a_one_line_error_before_any_model_runs(eval_pair, task_dir):
    pair = eval_pair("llama")
    result = CliRunner().invoke(cli, ["eval", *pair.args(), "--tasks", "no_such_task", "--include-path", str(task_dir)])
    assert result.exit_code == 2 and "no lm-eval task named 'no_such_task'" in result.output


def test_write_cards_records_task_accuracies_and_the_family_still_verifies(eval_pair, task_dir, tmp_path):
    from huggingface_hub import ModelCard

    pair = eval_pair("llama")
    family = tmp_path / "family"
    built = CliRunner().invoke(cli, ["build", *pair.args(), "--all", "--out", str(family)])
    assert built.exit_code == 0, built.output
    args = ["eval", *pair.args(), "--models", str(family), "--tasks", "tiny_docstring_mc", "--include-path",
            str(task_dir), "--batch-size", "4", "--out", str(tmp_path / "out"), "--write-cards", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((tmp_path / "out" / "tasks.json").read_text())
    manifest = json.loads((family / "manifest.json").read_text())
    directory = {entry["layers"]: entry["directory"] for entry in manifest["sizes"]}
    for size in report["sizes"]:
        card = ModelCard.load(family / directory[size["layers"]] / "README.md")
        recorded = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
        assert recorded[("tiny_docstring_mc", "acc")] == pytest.approx(size["scores"]["tiny_docstring_mc"]["acc"])
    verified = CliRunner().invoke(cli, ["verify", str(family)])
    assert verified.exit_code == 0, verified.output
