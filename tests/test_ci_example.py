"""examples/ci/publish.yml runs on the fixture pair: its own `run:` blocks, read from the workflow file;
and the laptop transcript in examples/ci/README.md runs as written.

The matrix's part jobs each run in a folder of their own (as on separate
runners); what the artifact steps do is done here by copying folders. Not
run: `install` (the package is installed already) and `upload` (it needs the
Hub and a token).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from huggingface_hub import ModelCard

from layersplice.evaluation.stdlib_text import HELD_OUT_MODULES, write_documents

REPOSITORY = Path(__file__).resolve().parent.parent
WORKFLOW = REPOSITORY / "examples" / "ci" / "publish.yml"
CI_README = REPOSITORY / "examples" / "ci" / "README.md"
NOT_RUN_HERE = {"install", "upload"}
FIXTURE_ENV = {
    "RECIPE": str(REPOSITORY / "recipes" / "tiny.yaml"),
    "NAME": "tiny",
    "EVAL_OPTIONS": "--seq-len 64 --max-tokens 1024 --device cpu",
    "HUB_OWNER": "nobody",
}
FIXTURE_PARTS = ["9,10,11,12", "13,14,15,16"]  # the tiny family's layer counts (recipes/tiny.yaml: 16-layer teacher, 9-layer student)
EXPRESSION = re.compile(r"\$\{\{\s*([\w.-]+)\s*\}\}")


def _run_steps(job: dict, env: dict, cwd: Path, matrix: dict) -> list[str]:
    """Run the job's `run:` steps in order (bash -e, as GitHub runs them); returns the ids run."""
    ran = []
    for step in job["steps"]:
        if "run" not in step or step.get("id") in NOT_RUN_HERE:
            continue
        step_env = {k: _expand(str(v), matrix) for k, v in (step.get("env") or {}).items()}
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step["run"]], cwd=cwd, env={**env, **step_env},
                                capture_output=True, text=True)
        assert result.returncode == 0, f"step {step.get('id')}: {result.stderr}"
        ran.append(step["id"])
    return ran


def _command_env() -> dict:
    """The environment the steps run in: `layersplice` found beside this interpreter, even in a venv not activated."""
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}


def _expand(value: str, matrix: dict) -> str:
    """${{ matrix.x }} from the matrix entry; other expressions (secrets) are empty here."""
    return EXPRESSION.sub(lambda m: str(matrix.get(m.group(1).removeprefix("matrix."), "")), value)


def test_the_ci_example_publishes_the_fixture_family(tmp_path):
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert set(workflow["jobs"]) == {"part", "publish"}
    env = {**_command_env(), **{k: str(v) for k, v in workflow["env"].items()}, **FIXTURE_ENV}
    env["HELD_OUT"] = str(write_documents(tmp_path / "held-out.jsonl", HELD_OUT_MODULES))
    assert "sizes" in workflow["jobs"]["part"]["strategy"]["matrix"]

    for index, sizes in enumerate(FIXTURE_PARTS):  # one runner per matrix entry
        runner = tmp_path / f"runner-{index}"
        runner.mkdir()
        assert _run_steps(workflow["jobs"]["part"], env, runner, {"sizes": sizes}) == ["build"]
        shutil.copytree(runner / "part", tmp_path / "publisher" / "downloaded" / f"part-{index}")  # the artifacts

    publisher = tmp_path / "publisher"
    assert _run_steps(workflow["jobs"]["publish"], env, publisher, {}) == ["assemble", "eval"]
    family = publisher / "family"
    manifest = json.loads((family / "manifest.json").read_text())
    assert [entry["layers"] for entry in manifest["sizes"]] == list(range(9, 17))
    assert json.loads((publisher / "verified.json").read_text())["ok"] is True
    measured = json.loads((publisher / "eval.json").read_text())["perplexity"]["sizes"]
    for row in measured:
        card = ModelCard.load(family / f"tiny-{row['layers']}L" / "README.md")
        assert [r.metric_value for r in card.data.eval_results] == [row["perplexity"]]


def test_the_laptop_transcript_in_the_ci_readme_runs_as_written(tmp_path):
    """From the root of a clone (here: a copy of its recipes/ and fixtures/), after the demo wrote its held-out text."""
    block = re.search(r"```bash\n(.*?)```", CI_README.read_text(encoding="utf-8"), flags=re.S).group(1)
    clone = tmp_path / "clone"
    for folder in ("recipes", "fixtures"):
        shutil.copytree(REPOSITORY / folder, clone / folder)
    (clone / "out" / "demo").mkdir(parents=True)
    write_documents(clone / "out" / "demo" / "held-out.jsonl", HELD_OUT_MODULES)  # as `layersplice demo` writes it
    env = _command_env()
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=clone, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    family = clone / "ci" / "family"
    manifest = json.loads((family / "manifest.json").read_text())
    assert [entry["layers"] for entry in manifest["sizes"]] == list(range(9, 17))
    measured = json.loads((clone / "ci" / "eval" / "eval.json").read_text())
    for row in measured["sizes"]:
        card = ModelCard.load(family / f"tiny-{row['layers']}L" / "README.md")
        assert [r.metric_value for r in card.data.eval_results] == [row["perplexity"]]
