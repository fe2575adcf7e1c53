"""Examples that run as written, a demo that keeps to its own folder, errors that start with `error:`.

* Every file an example in `--help` reads (--recipe, --data, --calib,
  --models, --include-path, --order-file, --arch) exists in a clone, is one
  the demo writes (the help says so), is written by an earlier example of the
  same help, or is an upper-case placeholder such as YOUR_TEXT.jsonl.
* `demo --out` writes only into a new, empty or earlier demo folder: a folder
  holding the user's own held-out.jsonl is refused, the file untouched.
* An error is one line starting with `error:`, never after an empty line (a
  progress bar that rich ends with a newline when stderr is not a terminal).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import ALIGNMENTS

from layersplice.cli.main import cli
from layersplice.errors import LayerspliceError

REPOSITORY = Path(__file__).resolve().parent.parent
READS_A_FILE = ("--recipe", "--data", "--calib", "--models", "--include-path", "--order-file", "--arch")
DEMO_WRITES = {"out/demo/held-out.jsonl", "out/demo/calibration.jsonl", "out/demo/sizes"}
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(\.[a-z]+)?/?")


def helps() -> dict[str, str]:
    """--help of the group and of every command (distill and tokenize loaded in full)."""
    ctx = click.Context(cli, resilient_parsing=True, info_name="layersplice")
    texts = {"layersplice": cli.get_help(ctx)}
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        texts[name] = command.get_help(click.Context(command, parent=ctx, info_name=name))
    return texts


def example_commands(text: str) -> list[list[str]]:
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    return [shlex.split(line.split("   ")[0], comments=True) for line in lines if line.startswith("layersplice ")]


@pytest.mark.parametrize("command", sorted(helps()))
def test_help_examples_read_files_that_exist_or_say_how_to_make_them(command):
    text = helps()[command]
    made = set()
    for words in example_commands(text):
        for option, value in zip(words, words[1:]):
            if option in READS_A_FILE:
                exists = (REPOSITORY / value).exists()
                from_demo = value.rstrip("/") in DEMO_WRITES and "layersplice demo" in text
                assert exists or from_demo or value in made or PLACEHOLDER.fullmatch(Path(value).name), (
                    f"{command} --help: {' '.join(words)}: {value} neither ships nor is made by an earlier example")
        made |= {value for option, value in zip(words, words[1:]) if option in ("--out", ">")}


def test_the_demo_refuses_a_folder_that_is_not_an_earlier_demo(tmp_path):
    from layersplice.cli.eval_commands import _claim_demo_folder

    mine = tmp_path / "work"
    mine.mkdir()
    (mine / "held-out.jsonl").write_text('{"text": "my own"}\n')
    with pytest.raises(LayerspliceError, match="not an earlier demo"):
        _claim_demo_folder(mine)
    assert [p.name for p in mine.iterdir()] == ["held-out.jsonl"]
    assert (mine / "held-out.jsonl").read_text() == '{"text": "my own"}\n'
    result = subprocess.run([sys.executable, "-m", "layersplice", "demo", "--out", str(mine)], capture_output=True,
                            text=True, env={"PYTHONPATH": str(REPOSITORY), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and result.stderr.startswith("error: --out"), result.stderr
    assert [p.name for p in mine.iterdir()] == ["held-out.jsonl"]


def test_the_demo_takes_a_new_empty_or_earlier_demo_folder(tmp_path):
    from layersplice.cli.eval_commands import DEMO_RECORD, _claim_demo_folder

    for folder in (tmp_path / "new", tmp_path / "empty"):
        _claim_demo_folder(folder)
        assert json.loads((folder / DEMO_RECORD).read_text())["complete"] is False
    earlier = tmp_path / "new"
    (earlier / "held-out.jsonl").write_text("{}\n")  # the demo's own text, from an interrupted run
    _claim_demo_folder(earlier)


@pytest.fixture(scope="module")
def pair(checkpoints):
    return checkpoints("llama", ALIGNMENTS["1-2-2"])


def test_an_error_after_a_progress_bar_starts_with_error(pair, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    models = ["--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir)]
    commands = {
        "build": ["build", *models, "--keep", "2", "--out", str(out)],
        "init-student": ["init-student", "--teacher", str(pair.teacher_dir), "--out", str(out)],
        "transfer": ["transfer", "--base-teacher", str(pair.teacher_dir), *models, "--out", str(out)],
    }
    for name, arguments in commands.items():
        result = subprocess.run([sys.executable, "-m", "layersplice", *arguments], capture_output=True, text=True,
                                env={"PYTHONPATH": str(REPOSITORY), "PATH": "/usr/bin:/bin"})
        assert result.returncode == 2, (name, result.stderr)
        assert result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1, (name, result.stderr)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
