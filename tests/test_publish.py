"""Publishing a family: model cards, --json on stdout, a family built in parts, eval results in the cards.

The fixture pair is put in a local Hugging Face cache as two Hub ids and read
offline, as a CI job reads them after a download.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from safetensors.numpy import load_file

from hub_support import put_snapshot

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TEACHER_ID, STUDENT_ID = "org/tiny-teacher", "org/tiny-student"
# What the Hub shows for a causal LM (the fixture is LlamaForCausalLM): its pipeline.
CAUSAL_LM_PIPELINE = "text-generation"
TEACHER_CARD = "---\nlicense: apache-2.0\n---\n\n# tiny teacher\n"


def _run(env: dict, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layersplice", *args], capture_output=True, text=True, env=env, cwd=cwd)


def _ok(env: dict, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = _run(env, *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory) -> dict:
    """HF_HUB_OFFLINE with the fixture pair cached as org/tiny-teacher (whose card states a license) and org/tiny-student."""
    root = tmp_path_factory.mktemp("hub")
    teacher = root / "teacher-files"
    shutil.copytree(FIXTURES / "tiny-teacher", teacher)
    (teacher / "README.md").write_text(TEACHER_CARD)
    put_snapshot(root / "cache", TEACHER_ID, "a" * 40, teacher)
    put_snapshot(root / "cache", STUDENT_ID, "b" * 40, FIXTURES / "tiny-student")
    repository = str(Path(__file__).resolve().parent.parent)
    return dict(os.environ, HF_HUB_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def family(hub_env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("family") / "sizes"
    _ok(hub_env, "build", "--teacher", TEACHER_ID, "--student", STUDENT_ID, "--all", "--name", "tiny", "--out", str(out))
    return out


def _layer_counts(env: dict) -> list[int]:
    """The distinct sizes of the family, as `plan` lists them."""
    plan = json.loads(_ok(env, "plan", "--teacher", TEACHER_ID, "--student", STUDENT_ID, "--json").stdout)
    return sorted({size["layers"] for size in plan["sizes"]})


def test_every_size_card_loads_with_the_hub_front_matter(family, hub_env):
    manifest = json.loads((family / "manifest.json").read_text())
    assert sorted(e["layers"] for e in manifest["sizes"]) == _layer_counts(hub_env)
    for entry in manifest["sizes"]:
        data = ModelCard.load(family / entry["directory"] / "README.md").data
        assert data.base_model == [TEACHER_ID, STUDENT_ID]
        assert data.base_model_relation == "merge"
        assert data.library_name == "transformers"
        assert data.pipeline_tag == CAUSAL_LM_PIPELINE
        assert {"layersplice", "boomerang-distillation"} <= set(data.tags)
        assert data.license == "apache-2.0"  # the teacher's own card says so
        assert "README.md" in entry["files"]  # listed, so verify covers it
    _ok(hub_env, "verify", str(family))


def test_card_command_rebuilds_the_same_weights(family, hub_env, tmp_path):
    size = family / "tiny-12L"
    card = ModelCard.load(size / "README.md")
    table = card.text.split("## Where every layer came from")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == json.loads((size / "config.json").read_text())["num_hidden_layers"]
    command = card.text.split("```bash\n")[1].split("\n```")[0]
    arguments = shlex.split(command)
    assert arguments[:2] == ["layersplice", "build"]
    # pinned to the cached commits that were read (put_snapshot below: "a" * 40 and "b" * 40)
    assert {("--teacher-revision", "a" * 40), ("--student-revision", "b" * 40)} <= set(zip(arguments, arguments[1:]))
    _ok(hub_env, *arguments[1:], cwd=tmp_path)
    assert load_file(tmp_path / "tiny-12L" / "model.safetensors").keys() == load_file(size / "model.safetensors").keys()
    assert (tmp_path / "tiny-12L" / "model.safetensors").read_bytes() == (size / "model.safetensors").read_bytes()
    assert (tmp_path / "tiny-12L" / "README.md").read_text() == (size / "README.md").read_text()


def test_local_paths_are_left_out_of_base_model_and_no_card_writes_none(tmp_path, hub_env):
    local = ["--teacher", str(FIXTURES / "tiny-teacher"), "--student", str(FIXTURES / "tiny-student"), "--keep", "2"]
    _ok(hub_env, "build", *local, "--out", str(tmp_path / "with"))
    data = ModelCard.load(tmp_path / "with" / "README.md").data
    assert data.base_model is None and data.license is None  # local paths; the fixture teacher has no card
    assert data.pipeline_tag == CAUSAL_LM_PIPELINE
    _ok(hub_env, "build", *local, "--no-card", "--out", str(tmp_path / "without"))
    assert not (tmp_path / "without" / "README.md").exists()
    _ok(hub_env, "verify", str(tmp_path / "without"))


def test_init_student_writes_a_card_and_one_json_document(tmp_path, hub_env):
    out = tmp_path / "student"
    result = _ok(hub_env, "init-student", "--teacher", TEACHER_ID, "--out", str(out), "--json")
    report = json.loads(result.stdout)
    assert report["outputs"][0]["layers"] == 9  # 16 teacher layers, 1/2/2: kept 0,2,4,…,14,15 (METHOD.md §2)
    assert {"README.md", "student_config.json"} <= set(report["outputs"][0]["files"])
    data = ModelCard.load(out / "README.md").data
    assert data.base_model == [TEACHER_ID] and data.license == "apache-2.0"
    _ok(hub_env, "verify", str(out))


def test_build_and_verify_json_are_one_document_on_stdout(tmp_path, hub_env):
    out = tmp_path / "mid"
    result = _ok(hub_env, "build", "--teacher", TEACHER_ID, "--student", STUDENT_ID, "--keep", "2", "--out", str(out), "--json")
    report = json.loads(result.stdout)  # the whole of stdout parses: exactly one document
    [output] = report["outputs"]
    assert output["layers"] == 14  # 2 of the 9 student blocks kept (order last): student 0, 1 + teacher 4-15
    on_disk = {p.name: p.stat().st_size for p in out.iterdir() if p.name != "layersplice.json"}
    assert {name: f["size"] for name, f in output["files"].items()} == on_disk
    verified = json.loads(_ok(hub_env, "verify", str(out), "--json").stdout)
    assert verified["ok"] and verified["files"] == len(on_disk)
    (out / "README.md").write_text("changed\n")
    failed = _run(hub_env, "verify", str(out), "--json")
    assert failed.returncode == 2 and json.loads(failed.stdout)["ok"] is False
    assert "README.md" in json.loads(failed.stdout)["problem"]


def test_two_disjoint_parts_into_one_out_verify_as_one_family(tmp_path, hub_env):
    counts = _layer_counts(hub_env)
    half = len(counts) // 2
    first, second = counts[:half], counts[half:]
    out = tmp_path / "family"
    source = ["--teacher", TEACHER_ID, "--student", STUDENT_ID, "--all", "--name", "tiny", "--out", str(out)]
    _ok(hub_env, "build", *source, "--sizes", ",".join(map(str, first)))
    _ok(hub_env, "build", *source, "--sizes", ",".join(map(str, second)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["layers"] for e in manifest["sizes"]] == counts
    assert len(list((out / "parts").iterdir())) == 2
    verified = json.loads(_ok(hub_env, "verify", str(out), "--json").stdout)
    assert len(verified["directories"]) == len(counts)


def test_parts_copied_together_need_assembling_then_verify(tmp_path, hub_env):
    counts = _layer_counts(hub_env)
    source = ["--teacher", TEACHER_ID, "--student", STUDENT_ID, "--all", "--name", "tiny"]
    _ok(hub_env, "build", *source, "--sizes", str(counts[0]), "--out", str(tmp_path / "a"))
    _ok(hub_env, "build", *source, "--sizes", ",".join(map(str, counts[1:])), "--out", str(tmp_path / "b"))
    combined = tmp_path / "combined"
    shutil.copytree(tmp_path / "b", combined)
    shutil.copytree(tmp_path / "a", combined, dirs_exist_ok=True)  # a's manifest.json overwrites b's
    stale = _run(hub_env, "verify", str(combined))
    assert stale.returncode == 2 and "layersplice assemble" in stale.stderr and "Traceback" not in stale.stderr
    _ok(hub_env, "assemble", str(combined))
    manifest = json.loads((combined / "manifest.json").read_text())
    assert [e["layers"] for e in manifest["sizes"]] == counts
    _ok(hub_env, "verify", str(combined))


def test_a_part_never_replaces_a_different_size_without_force(tmp_path, hub_env):
    out = tmp_path / "family"
    source = ["--teacher", TEACHER_ID, "--student", STUDENT_ID, "--all", "--name", "tiny", "--sizes", "12", "--out", str(out)]
    _ok(hub_env, "build", *source)
    before = (out / "tiny-12L" / "layersplice.json").read_bytes()
    _ok(hub_env, "build", *source)  # the same size again: kept as it is
    assert (out / "tiny-12L" / "layersplice.json").read_bytes() == before
    refused = _run(hub_env, "build", *source, "--no-card")
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert (out / "tiny-12L" / "layersplice.json").read_bytes() == before
    unknown = _run(hub_env, "build", *source[:-4], "--sizes", "99", "--out", str(out))
    assert unknown.returncode == 2 and "99" in unknown.stderr


def test_eval_writes_results_into_the_cards_and_verify_still_passes(family, hub_env, tmp_path):
    held_out = tmp_path / "held-out.txt"
    held_out.write_text((FIXTURES.parent / "README.md").read_text())
    evaluated = tmp_path / "evaluated"
    shutil.copytree(family, evaluated)
    result = _ok(hub_env, "eval", "--teacher", TEACHER_ID, "--student", STUDENT_ID, "--models", str(evaluated),
                 "--data", str(held_out), "--sizes", "5,0", "--seq-len", "64", "--max-tokens", "1024",
                 "--device", "cpu", "--out", str(tmp_path / "eval"), "--write-cards", "--json")
    report = json.loads(result.stdout)
    measured = {row["layers"]: row["perplexity"] for row in report["perplexity"]["sizes"]}
    assert len(measured) == 2 and len(report["cards"]) == 2
    for layers, perplexity in measured.items():
        card = ModelCard.load(evaluated / f"tiny-{layers}L" / "README.md")
        [entry] = card.data.eval_results
        assert (entry.metric_type, entry.dataset_name) == ("perplexity", held_out.name)
        assert entry.metric_value == pytest.approx(perplexity)
    _ok(hub_env, "verify", str(evaluated))


DESCRIBED = sorted(p.stem for p in (FIXTURES.parent / "layersplice" / "architectures").glob("*.yaml"))


@pytest.mark.parametrize("model_type", DESCRIBED)
def test_pipeline_tag_follows_transformers_task_mappings(model_type):
    """transformers' own task tables name each family's classes: causal LM, masked LM, bare model."""
    from transformers.models.auto import modeling_auto as auto

    from layersplice.output.card import pipeline_of

    expected = [
        (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "text-generation"),
        (auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, "fill-mask"),
        (auto.MODEL_MAPPING_NAMES, "feature-extraction"),
    ]
    checked = 0
    for mapping, pipeline in expected:
        if model_type in mapping:
            assert pipeline_of({"architectures": [mapping[model_type]]})[0] == pipeline
            checked += 1
    assert checked >= 2


def test_concurrent_parts_into_one_out_lose_nothing(tmp_path, hub_env):
    """Parts follow the one-writer rule: a part started while another writes OUT refuses (exit 2), and
    rerun afterwards, it completes the family."""
    counts = _layer_counts(hub_env)
    out = tmp_path / "family"
    source = ["--teacher", TEACHER_ID, "--student", STUDENT_ID, "--all", "--name", "tiny", "--out", str(out)]
    parts = [",".join(map(str, part)) for part in (counts[::2], counts[1::2])]
    runs = [
        subprocess.Popen([sys.executable, "-m", "layersplice", "build", *source, "--sizes", part],
                         env=hub_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for part in parts
    ]
    refused = []
    for part, run in zip(parts, runs):
        _, stderr = run.communicate(timeout=300)
        if run.returncode != 0:
            assert run.returncode == 2 and "being written by another layersplice run" in stderr, stderr
            refused.append(part)
    assert len(refused) < len(parts)
    for part in refused:
        _ok(hub_env, "build", *source, "--sizes", part)
    assert [e["layers"] for e in json.loads((out / "manifest.json").read_text())["sizes"]] == counts
    _ok(hub_env, "verify", str(out))
