"""What layersplice takes from a source model's own card (README.md): the
license its front matter states, passed on to the cards of the outputs.

Someone else's file, so read bounded and never fatal: only the front matter,
up to FRONT_MATTER_LIMIT bytes (a card's body may be long; its front matter is
a few hundred bytes, or tens of kB with a model index of evaluation results),
parsed with YAML anchors and aliases refused. A card that cannot be read, is
too large, is not valid YAML or states a license that is not one line gives a
one-line note, and the output's card goes without those values.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml

from layersplice.checkpoint.source import CARD_FILE, Checkpoint
from layersplice.schema import YamlRefused, parse_yaml, yaml_problem

FRONT_MATTER_LIMIT = 64 << 10
FRONT_MATTER_START = re.compile(rb"(?:\xef\xbb\xbf)?\s*---[ \t]*\r?\n")
FRONT_MATTER_END = re.compile(rb"\n---[ \t]*(?:\r?\n|$)")
LICENSE_LIMIT = 200


@dataclass(frozen=True)
class SourceCard:
    """What a source's own card supplies to ours, and why some of it was left out."""

    license: str | None
    note: str | None = None  # one line, naming the card; None when nothing was left out


def read_source_card(checkpoint: Checkpoint) -> SourceCard:
    """The license a model's own card (README.md) states in its front matter, or a note why not.

    Read once per run, though every size's card asks (kept while the file is unchanged)."""
    path = checkpoint.directory / CARD_FILE
    try:
        info = os.stat(path)
    except OSError:
        return _read_card(path, None)
    return _read_card(path, (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _read_card(path: Path, stamp: tuple | None) -> SourceCard:
    front, problem = _front_matter(path)
    if problem is None and front is not None:
        data, problem = _parse_front_matter(front)
        if problem is None:
            return _license_of(path, data)
    if problem is None:
        return SourceCard(None)
    return SourceCard(None, f"{path}: {problem}; the card leaves out what it would supply (the license)")


def _front_matter(path: Path) -> tuple[str | None, str | None]:
    """(the YAML between the opening and closing `---` lines or None when there is none, what is wrong)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a named pipe must not block
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror})"
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "is not a regular file"
        head = handle.read(FRONT_MATTER_LIMIT)
        whole = len(head) < FRONT_MATTER_LIMIT or not handle.read(1)
    start = FRONT_MATTER_START.match(head)
    if start is None:
        return None, None
    end = FRONT_MATTER_END.search(head, start.end() - 1)
    if end is not None and end.end() == len(head) and not whole and not end.group().endswith(b"\n"):
        end = None  # a `---` cut off by the cap may go on (`----`): not known to close anything
    if end is None:
        if whole:
            return None, "front matter has no closing --- line"
        return None, f"front matter does not end within the first {FRONT_MATTER_LIMIT >> 10} KiB, the most it may hold"
    try:
        return head[start.end() : end.start() + 1].decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "front matter is not UTF-8 text"


def _parse_front_matter(text: str) -> tuple[dict, str | None]:
    try:
        _, data = parse_yaml(text)
    except YamlRefused as exc:
        return {}, f"front matter line {exc.line + 1}: {exc.message}"
    except yaml.YAMLError as exc:
        line, problem = yaml_problem(exc)
        where = f"line {line + 1}: " if line is not None else ""  # +1: the opening --- line
        return {}, f"front matter is not valid YAML ({where}{problem})"
    except RecursionError:
        return {}, "front matter nests too deeply to read"
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        return {}, "front matter is not a mapping of keys to values"
    return data, None


def _license_of(path: Path, data: dict) -> SourceCard:
    """A license is one line of printable text (an identifier such as apache-2.0), never a block of text."""
    value = data.get("license")
    if value is None:
        return SourceCard(None)
    if isinstance(value, str) and value and value.isprintable() and len(value) <= LICENSE_LIMIT:
        return SourceCard(value)
    return SourceCard(None, f"{path}: its license is not a single-line identifier (such as apache-2.0); "
                            "the card leaves it out")
