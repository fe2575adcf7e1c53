"""A distill run's --out as a user publishes it: sealed, carded and verified like a build output;
Hub ids for the teacher and the student; a --config file; progress in a CI log; help everywhere."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from eval_support import one_torch_thread  # noqa: F401 - autouse: one thread for the tiny models
from hub_support import put_snapshot
from huggingface_hub import ModelCard
from test_distill_support import make_pair, sentences, write_jsonl

from layersplice.checkpoint.sealed_json import read_sealed, write_sealed
from layersplice.cli.main import cli

REPO = Path(__file__).resolve().parents[1]
TEACHER_CARD = "---\nlicense: apache-2.0\n---\n\n# tiny teacher\n"
COMMIT_T, COMMIT_S = "a" * 40, "c" * 40
# A whole progress line: every term, then the elapsed time and the time left.
PROGRESS_LINE = re.compile(
    r"distill step (\d+)/(\d+) loss \d+\.\d{4} ce \d+\.\d{4} kl -?\d+\.\d{4} cos -?\d+\.\d{4} "
    r"[\d,]+ tok/s \S+ TFLOP/s elapsed \d+:\d\d:\d\d eta \d+:\d\d:\d\d"
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    teacher, student = make_pair(root)
    return teacher, student, write_jsonl(root / "data.jsonl", sentences(200, seed=2))


def layersplice(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def small_run(*extra: str) -> list[str]:
    return ["--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "3e-3",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def finished(pair, tmp_path_factory):
    """A run from a --config file (its data, 6 steps, lr 0.003), whose --steps 4 on the command line wins."""
    teacher, student, data = pair
    root = tmp_path_factory.mktemp("run")
    config = root / "run.yaml"
    config.write_text(f"teacher: {teacher}\nstudent: {student}\ndata: {data}\nseq_len: 32\nsteps: 6\n"
                      "lr: 3e-3\nbatch_size: 4\nmicro_batch_size: 2\nval_tokens: 256\neval_every: 2\n"
                      "save_every: 2\ndevice: cpu\n")
    out = root / "student-distilled"
    result = layersplice("distill", "--config", config, "--steps", "4", "--out", out)
    assert result.exit_code == 0, result.output
    return out, config


def test_verify_passes_on_the_out_of_a_plain_run(pair, tmp_path):
    teacher, student, data = pair
    out = tmp_path / "plain"
    result = layersplice("distill", "--teacher", teacher, "--student", student, "--data", data, "--out", out,
                         *small_run("--steps", "2", "--save-every", "1", "--val-tokens", "0"))
    assert result.exit_code == 0, result.output
    verified = layersplice("verify", out)
    assert verified.exit_code == 0, verified.output
    assert verified.stdout.startswith("ok: 1 output(s)")


def test_a_finished_run_verifies_as_written_and_holds_nothing_unlisted(finished):
    out, _ = finished
    record, problem = read_sealed(out / "layersplice.json")
    assert problem is None and record["kind"] == "distill"
    assert sorted(p.name for p in out.iterdir()) == sorted([*record["files"], "layersplice.json"])
    assert {"README.md", "metrics.jsonl", "model.safetensors", "student_config.json", "tokenizer.json"} <= set(record["files"])
    assert not (out / "checkpoints").exists()  # written every 2 steps, removed once the record was sealed
    result = layersplice("verify", out, "--against-sources", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True


def test_verify_catches_a_changed_training_log_and_a_record_that_contradicts_the_student(finished, tmp_path):
    out, _ = finished
    edited = shutil.copytree(out, tmp_path / "edited")
    with (edited / "metrics.jsonl").open("r+b") as f:
        f.seek(5)
        byte = f.read(1)
        f.seek(5)
        f.write(bytes([byte[0] ^ 1]))
    result = layersplice("verify", edited)
    assert result.exit_code == 2 and "metrics.jsonl" in result.output and "blake3 does not match" in result.output

    contradicted = shutil.copytree(out, tmp_path / "contradicted")
    record, _ = read_sealed(contradicted / "layersplice.json")
    record["alignment"]["copied_teacher_layers"] = [0, 1, 2, 3]
    write_sealed(contradicted / "layersplice.json", record)
    result = layersplice("verify", contradicted)
    assert result.exit_code == 2
    assert "gives copied teacher layers [0, 2, 4, 5], but layersplice.json records [0, 1, 2, 3]" in result.output


def test_against_sources_compares_the_tensors_with_the_initial_students(finished, pair, tmp_path):
    out, _ = finished
    teacher, _, _ = pair
    moved = shutil.copytree(out, tmp_path / "moved")
    record, _ = read_sealed(moved / "layersplice.json")
    record["sources"]["student"] = {"reference": str(teacher), "revision": None, "directory": str(teacher)}
    write_sealed(moved / "layersplice.json", record)
    assert layersplice("verify", moved).exit_code == 0  # the files are intact
    result = layersplice("verify", moved, "--against-sources")
    assert result.exit_code == 2 and "does not match the plan re-made from the sources" in result.output


def test_the_run_records_the_merged_settings(finished, pair):
    out, config = finished
    record, _ = read_sealed(out / "layersplice.json")
    settings, origins = record["settings"], record["settings_from"]
    assert settings["steps"] == 4 and origins["steps"] == "command line"  # the flag overrides the file's 6
    assert settings["lr"] == 0.003 and origins["lr"] == "config file"  # 3e-3: a number, though YAML 1.1 says string
    assert settings["data"] == [str(pair[2])] and origins["data"] == "config file"  # one path: a list of one
    assert "shuffle_window" not in origins and settings["shuffle_window"] == 1024  # left at its default
    assert record["config_file"] == str(config)
    assert record["training"]["steps"] == 4 and record["training"]["lr"] == 0.003
    assert record["training"]["tokens"] == 4 * 4 * 32
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]
    assert record["final_metrics"]["train"]["step"] == 4 and record["final_metrics"]["validation"]["step"] == 4


def test_the_card_says_what_the_student_was_trained_on_and_its_build_command_works(finished, pair, tmp_path):
    out, _ = finished
    teacher, student, _ = pair
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None  # a local teacher: no Hub id to name
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert f"from the initial student `{student}`" in card.text
    assert "4 steps of 4 sequences of 32 tokens" in card.text and "local text `data.jsonl`" in card.text
    assert "Validation loss" in card.text
    trained_with = re.search(r"## How it was trained\n\n```bash\n(.*)\n```", card.text).group(1)
    assert "--steps 4" in trained_with and "--lr 0.003" in trained_with and "--out student-distilled" in trained_with
    build = re.search(r"^layersplice (build .*)$", card.text, re.M).group(1).split()
    # The card names the student by its folder, as the repository it is uploaded to will be named.
    assert build == ["build", "--teacher", str(teacher), "--student", "student-distilled", "--all", "--out",
                     "student-distilled-sizes"]
    sizes = tmp_path / "sizes"
    result = layersplice("build", "--teacher", teacher, "--student", out, "--all", "--out", sizes)
    assert result.exit_code == 0, result.output
    assert layersplice("verify", sizes).exit_code == 0


def test_a_finished_run_is_neither_resumed_nor_run_over(finished, pair):
    out, config = finished
    for extra in (["--resume"], []):
        result = layersplice("distill", "--config", config, "--out", out, *extra)
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines() == [
            f"error: --out {out} holds a finished run (its student is sealed in layersplice.json); "
            "choose a new --out, and give this one as --student to train it further"
        ]


def test_keep_checkpoints_keeps_them_and_verify_names_them(pair, tmp_path):
    teacher, student, data = pair
    out = tmp_path / "kept"
    result = layersplice("distill", "--teacher", teacher, "--student", student, "--data", data, "--out", out,
                         *small_run("--steps", "2", "--save-every", "2", "--val-tokens", "0", "--keep-checkpoints"))
    assert result.exit_code == 0, result.output
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    refused = layersplice("verify", out)
    assert refused.exit_code == 2 and "--allow-extra checkpoints" in refused.output
    assert layersplice("verify", out, "--allow-extra", "checkpoints").exit_code == 0



def test_local_models_declared_by_hub_id_are_named_by_it_in_the_card_and_record(pair, tmp_path):
    """--teacher-id from a --config file, --student-id from the command line: the card's base_model and
    commands name the Hub repos, as build cards do, and no local path of either model."""
    teacher, student, data = pair
    config = tmp_path / "run.yaml"
    config.write_text(f"teacher: {teacher}\nteacher_id: org/teacher\nteacher_revision: v1\n")
    out = tmp_path / "declared"
    result = layersplice("distill", "--config", config, "--student", student, "--student-id", "org/student",
                         "--hub-owner", "me", "--data", data, "--out", out,
                         *small_run("--steps", "1", "--val-tokens", "0"))
    assert result.exit_code == 0, result.output
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/teacher"] and card.data.base_model_relation == "finetune"
    assert "The student of `org/teacher`" in card.text and "from the initial student `org/student`" in card.text
    trained_with = re.search(r"## How it was trained\n\n```bash\n(.*)\n```", card.text).group(1)
    assert trained_with.startswith(
        "layersplice distill --teacher org/teacher --teacher-revision v1 --student org/student --data ")
    assert "--teacher-id" not in trained_with and "--student-id" not in trained_with
    # --hub-owner: the sizes are built from the student where it will be uploaded, and it loads from there
    assert "--teacher org/teacher --teacher-revision v1 --student me/declared --all" in card.text
    assert 'from_pretrained("me/declared")' in card.text and "hf download me/declared --local-dir declared" in card.text
    assert str(teacher) not in card.text and str(student) not in card.text
    record, _ = read_sealed(out / "layersplice.json")
    assert record["sources"]["teacher"] == {"reference": str(teacher), "revision": "v1", "directory": str(teacher),
                                            "hub_id": "org/teacher"}
    assert record["settings_from"]["teacher_id"] == "config file" and record["settings"]["student_id"] == "org/student"
    verified = layersplice("verify", out, "--against-sources")
    assert verified.exit_code == 0, verified.output


def test_a_declared_hub_id_that_is_no_repo_id_is_refused_before_the_run(pair, tmp_path):
    teacher, student, data = pair
    out = tmp_path / "never"
    result = layersplice("distill", "--teacher", teacher, "--student", student, "--student-id", "org/a b",
                         "--data", data, "--out", out, *small_run("--steps", "1"))
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr.splitlines() == [
        "error: --student-id 'org/a b': not a Hub repo id; give OWNER/NAME, e.g. Qwen/Qwen3-4B-Base"]

@pytest.mark.parametrize(("text", "line", "message"), [
    ("steps: 4\nlr_rate: 0.1\n", 2, "lr_rate: unknown key; the keys are the options of `layersplice distill --help`"),
    ("seq_lne: 64\n", 1, "seq_lne: unknown key; did you mean seq_len?"),
    ("steps: 4\n\nsteps_: x\nbatch_size: 2.5\n", 3, "steps_: unknown key"),
    ("batch_size: 2.5\n", 1, "batch_size: expected an integer, got float 2.5"),
    ("device: gpu\n", 1, "device: must be one of 'auto', 'cpu', 'cuda', not 'gpu'"),
    ("compile: 1\n", 1, "compile: expected true or false, got int 1"),
    ("steps: [4\n", 2, "not valid YAML"),
])
def test_a_config_file_mistake_is_one_line_naming_the_file_and_line(tmp_path, text, line, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    result = layersplice("distill", "--config", config, "--teacher", "t", "--student", "s", "--out", tmp_path / "o")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}:{line}: {message}"), lines
    assert not (tmp_path / "o").exists()


def _options():
    ctx = click.Context(cli, resilient_parsing=True)  # loads the commands kept out of the CLI's start
    for name in cli.list_commands(ctx):
        yield from ((name, p) for p in cli.get_command(ctx, name).params if isinstance(p, click.Option))


def test_every_option_of_every_command_has_help():
    seen = list(_options())
    assert {"build", "distill", "eval", "verify"} <= {name for name, _ in seen}
    assert any(name == "distill" and option.name == "lr" for name, option in seen)  # the real command, not its stub
    assert [f"{name} {option.opts[0]}" for name, option in seen if not (option.help or "").strip()] == []


def test_distill_names_the_models_as_the_other_commands_do():
    ctx = click.Context(cli, resilient_parsing=True)
    distill, build = (cli.get_command(ctx, name) for name in ("distill", "build"))
    by_name = {c: {p.name: p for p in command.params} for c, command in (("distill", distill), ("build", build))}
    for name in ("teacher", "teacher_revision", "student_revision"):
        a, b = by_name["distill"][name], by_name["build"][name]
        assert (a.opts, a.help, type(a.type)) == (b.opts, b.help, type(b.type)), name
    assert list(by_name["distill"]["device"].type.choices) == ["auto", "cpu", "cuda"]


def _distill_subprocess(env: dict, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "layersplice", "distill", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)


def test_progress_in_a_ci_log_is_whole_lines(pair, tmp_path):
    teacher, student, data = pair
    done = _distill_subprocess(dict(os.environ), "--teacher", teacher, "--student", student, "--data", data,
                               "--out", tmp_path / "out", *small_run("--steps", "6", "--eval-every", "3",
                                                                     "--val-tokens", "256"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""  # progress and messages go to stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr and "…" not in done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("distill step")]
    assert [PROGRESS_LINE.fullmatch(line) is not None for line in progress] == [True] * 6, progress
    assert [line.split()[2] for line in progress] == [f"{step}/6" for step in range(1, 7)]
    validation = [line for line in done.stderr.splitlines() if "val loss" in line]
    assert [re.fullmatch(r"step (\d): val loss \d+\.\d{4} ce \d+\.\d{4}", line).group(1) for line in validation] == [
        "0", "3", "6"]


def test_hub_ids_resolve_offline_and_the_card_names_the_teacher(pair, tmp_path):
    teacher, student, data = pair
    with_card = shutil.copytree(teacher, tmp_path / "teacher-copy")
    (with_card / "README.md").write_text(TEACHER_CARD)
    cache = tmp_path / "cache"
    put_snapshot(cache, "org/teacher", COMMIT_T, with_card)
    put_snapshot(cache, "org/student", COMMIT_S, student, ref=None)  # only by its commit
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out = tmp_path / "hub-student"
    done = _distill_subprocess(env, "--teacher", "org/teacher", "--student", "org/student", "--student-revision",
                               COMMIT_S, "--data", data, "--out", out, *small_run("--steps", "2", "--val-tokens", "0"))
    assert done.returncode == 0, done.stderr[-3000:]
    record, _ = read_sealed(out / "layersplice.json")
    assert record["sources"]["teacher"]["reference"] == "org/teacher"
    assert record["sources"]["student"] == {"reference": "org/student", "revision": COMMIT_S,
                                            "directory": str(cache / "models--org--student" / "snapshots" / COMMIT_S)}
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/teacher"] and card.data.base_model_relation == "finetune"
    assert card.data.license == "apache-2.0"  # the teacher's own card says so
    assert f"--teacher org/teacher --teacher-revision {COMMIT_T} --student hub-student --all" in card.text
    assert f"--student org/student --student-revision {COMMIT_S}" in card.text
    verified = subprocess.run([sys.executable, "-m", "layersplice", "verify", str(out), "--against-sources"],
                              env=env, capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr

    missing = _distill_subprocess(env, "--teacher", "org/absent", "--student", "org/student", "--synthetic-data",
                                  "--out", tmp_path / "never")
    assert missing.returncode == 2 and not (tmp_path / "never").exists()
    assert missing.stderr.splitlines() == [
        "error: --teacher org/absent: not a local directory and not in the Hugging Face cache (offline mode or no "
        "network); download it first or unset HF_HUB_OFFLINE"
    ]


def test_a_diverged_loss_is_written_to_metrics_as_json_null_not_nan(tmp_path):
    """A loss that became NaN or infinite is logged as null: NaN is not JSON, and strict readers
    (jq, JSON.parse) would reject the whole metrics file."""
    from layersplice.distill.progress import METRICS_NAME, RunLog

    with RunLog(tmp_path, steps=2, start_step=0, enabled=True) as log:
        log.record({"step": 1, "val_loss": float("nan"), "val_ce": float("inf"), "val_kl": 0.5})

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    line = (tmp_path / METRICS_NAME).read_text().splitlines()[0]
    assert json.loads(line, parse_constant=refuse) == {"step": 1, "val_loss": None, "val_ce": None, "val_kl": 0.5}
