"""A teacher's own model card (README.md) is read bounded and never fails a
build: front matter too large, not valid YAML, using anchors, or stating a
license that is not one line gives one note naming the card, and the output's
card is written without the values it would have supplied."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LICENSE = "license: apache-2.0\n"

# id: (the teacher's README.md, what its one note says after "note: <path>: ")
UNUSABLE_CARDS = {
    "invalid-yaml": (f"---\n{LICENSE}tags: [unclosed\n---\n# teacher\n",
                     "front matter is not valid YAML (line 4: did not find expected ',' or ']')"),
    "oversized": (f"---\n{LICENSE}" + "# padding\n" * 200_000 + "---\n# teacher\n",
                  "front matter does not end within the first 64 KiB, the most it may hold"),
    "alias-bomb": ("---\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                   f"c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n{LICENSE}---\n",
                   "front matter line 2: YAML anchors and aliases (&name, *name) are not accepted here"),
    "not-utf8": (b"---\nlicense: apache-2.0\nname: \xff\xfe\n---\n", "front matter is not UTF-8 text"),
    "multi-line-license": ("---\nlicense: |\n  apache-2.0\n  and these extra terms\n---\n# teacher\n",
                           "its license is not a single-line identifier (such as apache-2.0); the card leaves it out"),
    "license-list": ("---\nlicense: [apache-2.0, mit]\n---\n",
                     "its license is not a single-line identifier (such as apache-2.0); the card leaves it out"),
}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layersplice", *args], capture_output=True, text=True)


def _teacher_with_card(tmp_path: Path, card: str | bytes) -> Path:
    teacher = tmp_path / "teacher"
    shutil.copytree(FIXTURES / "tiny-teacher", teacher)
    (teacher / "README.md").write_bytes(card.encode() if isinstance(card, str) else card)
    return teacher


def _assert_one_note(lines: list[str], teacher: Path, says: str) -> None:
    assert len(lines) == 1 and lines[0].startswith(f"note: {teacher / 'README.md'}: {says}"), lines
    assert "leaves" in lines[0] and "license" in lines[0], lines


@pytest.mark.parametrize("case", sorted(UNUSABLE_CARDS))
def test_an_unusable_teacher_card_gives_one_note_and_a_card_without_its_values(tmp_path, case):
    text, says = UNUSABLE_CARDS[case]
    teacher = _teacher_with_card(tmp_path, text)
    out = tmp_path / "out"
    result = _run("build", "--teacher", str(teacher), "--student", str(FIXTURES / "tiny-student"), "--keep", "2",
                  "--out", str(out))
    assert result.returncode == 0, result.stderr
    _assert_one_note(result.stderr.splitlines(), teacher, says)
    card = ModelCard.load(out / "README.md")
    assert card.data.license is None and "extra terms" not in card.content
    assert _run("verify", str(out)).returncode == 0

    student = tmp_path / "student"
    result = _run("init-student", "--teacher", str(teacher), "--out", str(student))
    assert result.returncode == 0, result.stderr
    _assert_one_note([line for line in result.stderr.splitlines() if line.startswith("note:")], teacher, says)
    assert ModelCard.load(student / "README.md").data.license is None


def test_no_card_reads_no_teacher_card(tmp_path):
    teacher = _teacher_with_card(tmp_path, UNUSABLE_CARDS["invalid-yaml"][0])
    result = _run("build", "--teacher", str(teacher), "--student", str(FIXTURES / "tiny-student"), "--keep", "2",
                  "--out", str(tmp_path / "out"), "--no-card")
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("card", ["---\nlicense: apache-2.0\n---\n# t\n", "\ufeff---\r\nlicense: apache-2.0\r\n---\r\n",
                                  "---\nlicense: apache-2.0\n---", "---\nlicense: apache-2.0\n" + "# x\n" * 15_000 + "---\n"],
                         ids=["plain", "bom-and-crlf", "no-body", "large-but-under-the-cap"])
def test_a_usable_license_is_passed_on_without_a_note(tmp_path, card):
    teacher = _teacher_with_card(tmp_path, card)
    out = tmp_path / "out"
    result = _run("build", "--teacher", str(teacher), "--student", str(FIXTURES / "tiny-student"), "--keep", "2",
                  "--out", str(out))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert ModelCard.load(out / "README.md").data.license == "apache-2.0"
