"""Cards of outputs made from local copies keep their Hub lineage, and transfer outputs are carded.

Users download models (`hf download --local-dir`) and pass folders. Declared
with --teacher-id / --student-id / --base-teacher-id (or a recipe's
teacher_id / student_id), the Hub repos become the cards' base_model and the
names in their rebuild commands; --hub-owner (or the recipe's hub_owner)
becomes the repo the snippets load. Every card must load with
huggingface_hub.ModelCard.load, and every output must still verify.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ALIGNMENTS
from huggingface_hub import ModelCard

from layersplice.evaluation.stdlib_text import HELD_OUT_MODULES, write_documents

REPOSITORY = Path(__file__).resolve().parent.parent
FIXTURES = REPOSITORY / "fixtures"
TEACHER_ID, STUDENT_ID, VARIANT_ID = "org/teacher-base", "org/student", "org/teacher-instruct"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layersplice", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={"PYTHONPATH": str(REPOSITORY), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


def ok(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = run(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result


def rebuild_command(card: ModelCard) -> list[str]:
    """The command in the card's "Rebuild it" section."""
    section = card.text.split("## Rebuild it")[1]
    return shlex.split(section.split("```bash\n")[1].split("```")[0])


@pytest.fixture(scope="module")
def pair(checkpoints):
    return checkpoints("llama-tied", ALIGNMENTS["1-2-2"])


def test_a_family_built_from_local_copies_names_their_hub_repos(pair, tmp_path):
    out = tmp_path / "sizes"
    ok("build", "--teacher", pair.teacher_dir, "--teacher-id", TEACHER_ID, "--teacher-revision", COMMIT,
       "--student", pair.student_dir, "--student-id", STUDENT_ID, "--hub-owner", "me", "--all", "--out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["sizes"]:
        card = ModelCard.load(out / entry["directory"] / "README.md")
        assert card.data.base_model == [TEACHER_ID, STUDENT_ID]
        assert card.data.base_model_relation == "merge"
        command = rebuild_command(card)
        assert command[command.index("--teacher") + 1] == TEACHER_ID
        assert command[command.index("--teacher-revision") + 1] == COMMIT
        assert command[command.index("--student") + 1] == STUDENT_ID
        assert str(pair.teacher_dir) not in card.content
        assert f'from_pretrained("me/{entry["directory"]}")' in card.text
        assert f"hf download me/{entry['directory']}" in card.text
        assert entry["directory"].startswith("student-")  # named for --student-id, not the teacher's folder
    ok("verify", out)


def test_the_commit_hf_download_noted_in_a_copy_pins_the_card(pair, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(pair.teacher_dir, teacher)
    notes = teacher / ".cache" / "huggingface" / "download"
    notes.mkdir(parents=True)
    (notes / "config.json.metadata").write_text(f"{COMMIT}\n\"etag\"\n1700000000.0\n")
    out = tmp_path / "mid"
    ok("build", "--teacher", teacher, "--teacher-id", TEACHER_ID, "--student", pair.student_dir, "--keep", "2",
       "--out", out)
    command = rebuild_command(ModelCard.load(out / "README.md"))
    assert command[command.index("--teacher-revision") + 1] == COMMIT
    assert ModelCard.load(out / "README.md").data.base_model == [TEACHER_ID]  # the student has no Hub id


def test_a_recipe_declares_the_hub_ids_and_owner(pair, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: fam\nteacher: {pair.teacher_dir}\nstudent: {pair.student_dir}\n"
                      f"teacher_id: {TEACHER_ID}\nstudent_id: {STUDENT_ID}\nhub_owner: team\n")
    out = tmp_path / "fam-3L"
    ok("build", "--recipe", recipe, "--layers", "5", "--out", out)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [TEACHER_ID, STUDENT_ID]
    assert 'from_pretrained("team/fam-3L")' in card.text
    student = tmp_path / "student-init"
    ok("init-student", "--recipe", recipe, "--out", student)
    card = ModelCard.load(student / "README.md")
    assert card.data.base_model == [TEACHER_ID]
    assert rebuild_command(card)[:4] == ["layersplice", "init-student", "--teacher", TEACHER_ID]
    assert 'from_pretrained("team/student-init")' in card.text


def test_a_declared_id_must_be_a_hub_repo_id(pair, tmp_path):
    result = run("build", "--teacher", pair.teacher_dir, "--teacher-id", "./not/a/repo", "--student",
                 pair.student_dir, "--keep", "2", "--out", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.startswith("error: --teacher-id './not/a/repo'"), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def trio(pair, tmp_path_factory):
    """The pair's teacher as the base, the same teacher as its 'variant', and the pair's student."""
    return pair.teacher_dir, pair.teacher_dir, pair.student_dir


def test_a_transfer_output_carries_a_card_and_verifies(trio, tmp_path):
    base, variant, student = trio
    out = tmp_path / "variant-student"
    ok("transfer", "--base-teacher", base, "--base-teacher-id", TEACHER_ID, "--teacher", variant,
       "--teacher-id", VARIANT_ID, "--student", student, "--student-id", STUDENT_ID, "--hub-owner", "me",
       "--out", out)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [VARIANT_ID, STUDENT_ID, TEACHER_ID]
    assert card.data.base_model_relation == "merge"
    assert card.data.pipeline_tag == "text-generation"
    command = rebuild_command(card)
    assert command[:2] == ["layersplice", "transfer"]
    assert [command[command.index(o) + 1] for o in ("--base-teacher", "--teacher", "--student")] == [
        TEACHER_ID, VARIANT_ID, STUDENT_ID]
    assert 'from_pretrained("me/variant-student")' in card.text
    record = json.loads((out / "layersplice.json").read_text())
    assert "README.md" in record["files"]  # so verify covers it
    ok("verify", out)
    ok("verify", "--against-sources", out)


def test_the_command_in_a_transfer_card_rebuilds_the_same_bytes(trio, tmp_path):
    base, variant, student = trio
    first = tmp_path / "first" / "variant-student"
    ok("transfer", "--base-teacher", base, "--teacher", variant, "--student", student, "--out", first)
    command = rebuild_command(ModelCard.load(first / "README.md"))
    again = tmp_path / "again"
    again.mkdir()
    ok(*command[1:], cwd=again)
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (again / "variant-student" / name).read_bytes() == (first / name).read_bytes(), name


def test_no_card_leaves_the_transfer_card_out_and_it_still_verifies(trio, tmp_path):
    base, variant, student = trio
    out = tmp_path / "bare"
    ok("transfer", "--base-teacher", base, "--teacher", variant, "--student", student, "--no-card", "--out", out)
    assert not (out / "README.md").exists()
    ok("verify", out)


@pytest.fixture(scope="module")
def fixture_family(tmp_path_factory):
    """The trained fixture pair's family, and held-out text."""
    root = tmp_path_factory.mktemp("family")
    ok("build", "--recipe", REPOSITORY / "recipes" / "tiny.yaml", "--all", "--sizes", "9,12,16", "--out", root / "sizes")
    return root / "sizes", write_documents(root / "held-out.jsonl", HELD_OUT_MODULES[:2])


def test_write_cards_names_the_data_as_asked_and_tables_the_results(fixture_family, tmp_path):
    family, held_out = fixture_family
    options = ("--seq-len", "64", "--max-tokens", "512", "--device", "cpu", "--write-cards", "--json")
    first = json.loads(ok("eval", "--models", family, "--data", held_out, "--data-name", "Python docstrings",
                          "--out", tmp_path / "a", *options).stdout)
    second = json.loads(ok("eval", "--models", family, "--data", held_out, "--data-name", "again",
                           "--out", tmp_path / "b", *options).stdout)
    for one, other in zip(first["perplexity"]["sizes"], second["perplexity"]["sizes"]):
        card = ModelCard.load(family / f"tiny-{one['layers']}L" / "README.md")
        named = {(r.dataset_name, r.dataset_type): r.metric_value for r in card.data.eval_results}
        assert named == {("Python docstrings", "python-docstrings"): one["perplexity"],
                         ("again", "again"): other["perplexity"]}
        table = card.text.split("## Evaluation results")[1].split("\n## ")[0]
        assert f"| Python docstrings | perplexity | {one['perplexity']:.4f} |" in table
        assert f"| again | perplexity | {other['perplexity']:.4f} |" in table
        assert card.text.count("## Evaluation results") == 1
    ok("verify", family)


def test_results_of_a_card_written_when_dataset_type_held_the_name_are_replaced_not_doubled():
    from huggingface_hub import EvalResult

    from layersplice.output.result_cards import Score, card_with_results

    old = ModelCard("---\nlicense: mit\n---\n# tiny-12L\n")
    old.data.eval_results = [EvalResult(task_type="text-generation", dataset_type="WikiText-2 test",
                                        dataset_name="WikiText-2 test", metric_type="perplexity", metric_value=20.0)]
    old.data.model_name = "tiny-12L"
    again = ModelCard(card_with_results(str(old), "tiny-12L", [Score("WikiText-2 test", "perplexity", 18.5)]))
    assert [(r.dataset_name, r.metric_value) for r in again.data.eval_results] == [("WikiText-2 test", 18.5)]
