"""A family's records agree with each other and with its sizes, or it is refused:
parts whose sources were other bytes (a Hub id at another commit, a local
directory of other content) are not assembled, every part and manifest entry
must equal what the size's own sealed layersplice.json says, and a
`build --all --sizes` run that fails part-way leaves a family of the sizes it
finished, which verifies and which a rerun keeps."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hub_support import put_snapshot
from layersplice.checkpoint.sealed_json import read_sealed, seal

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TEACHER_ID, STUDENT_ID = "org/tiny-teacher", "org/tiny-student"
COMMIT_A, COMMIT_B, COMMIT_C = "a" * 40, "b" * 40, "c" * 40
HUB_PAIR = ["--teacher", TEACHER_ID, "--student", STUDENT_ID, "--all", "--name", "tiny"]
LOCAL_PAIR = ["--student", str(FIXTURES / "tiny-student"), "--all", "--name", "tiny"]


def _run(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layersplice", *args], capture_output=True, text=True,
                          env=env or os.environ, **kwargs)


def _ok(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = _run(*args, env=env)
    assert result.returncode == 0, result.stderr
    return result


def _refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture()
def hub(tmp_path) -> tuple[dict, Path]:
    """HF_HUB_OFFLINE with the fixture pair cached as org/tiny-teacher (main at COMMIT_A) and org/tiny-student."""
    cache = tmp_path / "cache"
    put_snapshot(cache, TEACHER_ID, COMMIT_A, FIXTURES / "tiny-teacher")
    put_snapshot(cache, STUDENT_ID, COMMIT_B, FIXTURES / "tiny-student")
    return dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1"), cache


def test_parts_from_one_hub_id_at_different_commits_are_refused(tmp_path, hub):
    env, cache = hub
    _ok("build", *HUB_PAIR, "--sizes", "9,10", "--out", str(tmp_path / "a"), env=env)
    put_snapshot(cache, TEACHER_ID, COMMIT_C, FIXTURES / "tiny-teacher")  # main moves on (same files, another commit)
    _ok("build", *HUB_PAIR, "--sizes", "11,12", "--out", str(tmp_path / "b"), env=env)
    combined = tmp_path / "combined"
    shutil.copytree(tmp_path / "a", combined)
    shutil.copytree(tmp_path / "b", combined, dirs_exist_ok=True)
    for command in ("assemble", "verify"):
        _refused(_run(command, str(combined), env=env), "parts/tiny-", "was built from other models than parts/tiny-",
                 f"its teacher is {TEACHER_ID} at commit", COMMIT_A, COMMIT_C)

    # A part run into a family of the older commit refuses before it writes anything.
    before = _tree(tmp_path / "a")
    _refused(_run("build", *HUB_PAIR, "--sizes", "13", "--out", str(tmp_path / "a"), env=env),
             "parts/tiny-9L-10L.json was built from other models", f"at commit {COMMIT_A}, this run's", COMMIT_C)
    assert _tree(tmp_path / "a") == before


def test_local_sources_are_told_apart_by_their_content_not_their_path(tmp_path):
    first, moved = tmp_path / "one" / "teacher", tmp_path / "two" / "teacher"
    shutil.copytree(FIXTURES / "tiny-teacher", first)
    shutil.copytree(FIXTURES / "tiny-teacher", moved)
    family = tmp_path / "family"
    _ok("build", "--teacher", str(first), *LOCAL_PAIR, "--sizes", "9,10", "--out", str(family))
    # The same bytes at another path (another machine's checkout): one family.
    _ok("build", "--teacher", str(moved), *LOCAL_PAIR, "--sizes", "11", "--out", str(family))
    _ok("verify", str(family))
    # Other bytes at a path already used: refused, naming the digest.
    generation = moved / "generation_config.json"
    generation.write_text(json.dumps({**json.loads(generation.read_text()), "temperature": 0.5}))
    before = _tree(family)
    _refused(_run("build", "--teacher", str(moved), *LOCAL_PAIR, "--sizes", "12", "--out", str(family)),
             "was built from other models: its teacher is", "with content blake3")
    assert _tree(family) == before


def _reseal(path: Path, edit) -> None:
    record, problem = read_sealed(path)
    assert problem is None, problem
    edit(record)
    path.write_text(seal(record))


def _entry(record: dict, directory: str) -> dict:
    return next(entry for entry in record["sizes"] if entry["directory"] == directory)


def _family(tmp_path: Path) -> Path:
    family = tmp_path / "family"
    _ok("build", "--teacher", str(FIXTURES / "tiny-teacher"), *LOCAL_PAIR, "--sizes", "9,10", "--out", str(family))
    _ok("build", "--teacher", str(FIXTURES / "tiny-teacher"), *LOCAL_PAIR, "--sizes", "12", "--out", str(family))
    return family


# What is edited in the part record of tiny-10L (and the manifest, re-sealed to match), and what the error says.
EDITS = {
    "patched-blocks": (lambda e: e.update(patched_blocks=[0]), "with other patched_blocks than"),
    "parameters": (lambda e: e.update(parameters=e["parameters"] + 1), "with other parameters than"),
    "a-field-the-record-lacks": (lambda e: e.update(order="first"), "with other order than"),
    "a-file-checksum": (lambda e: e["files"]["config.json"].update(blake3="0" * 64), "with other files than"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_part_record_that_disagrees_with_its_size_is_refused_by_assemble_and_verify(tmp_path, edit):
    change, says = EDITS[edit]
    family = _family(tmp_path)
    part = family / "parts" / "tiny-9L-10L.json"
    _reseal(part, lambda record: change(_entry(record, "tiny-10L")))
    _reseal(family / "manifest.json", lambda record: change(_entry(record, "tiny-10L")))
    for command in ("verify", "assemble"):
        _refused(_run(command, str(family)), f"parts/tiny-9L-10L.json records tiny-10L {says}", "tiny-10L/layersplice.json")


def test_a_manifest_without_parts_must_agree_with_each_size(tmp_path):
    family = _family(tmp_path)
    shutil.rmtree(family / "parts")  # a family from before part records
    _ok("verify", str(family))
    _reseal(family / "manifest.json", lambda record: _entry(record, "tiny-12L").update(patched_blocks=[8]))
    _refused(_run("verify", str(family)), "manifest.json records tiny-12L with other patched_blocks than "
                                          "tiny-12L/layersplice.json")


def test_a_part_that_names_other_sources_than_its_sizes_is_refused(tmp_path):
    family = _family(tmp_path)

    def rename(record: dict) -> None:
        record["sources"]["teacher"]["reference"] = "org/another-teacher"

    for part in (family / "parts").iterdir():
        _reseal(part, rename)
    _reseal(family / "manifest.json", rename)
    for command in ("verify", "assemble"):
        _refused(_run(command, str(family)), "tiny-", "/layersplice.json names other sources than parts/tiny-")


def _fail_after_4_4_mb() -> None:
    """A full disk for the third size: the fixture's 9- and 10-layer shards (3.0, 4.0 MB) fit, the 16-layer (4.7 MB) does not."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4_400_000, 4_400_000))


def test_a_run_that_fails_on_its_third_size_leaves_a_family_of_two_that_verifies_and_a_rerun_keeps_them(tmp_path):
    family = tmp_path / "family"
    args = ["build", "--teacher", str(FIXTURES / "tiny-teacher"), *LOCAL_PAIR, "--sizes", "9,10,16", "--out", str(family)]
    failed = _run(*args, preexec_fn=_fail_after_4_4_mb)
    _refused(failed, "File too large", "tiny-9L, tiny-10L finished, recorded in")
    assert sorted(p.name for p in (family / "parts").iterdir()) == ["tiny-9L-10L.json"]
    assert json.loads(_ok("verify", str(family), "--json").stdout)["directories"] == [
        str(family / "tiny-9L"), str(family / "tiny-10L")]
    inodes = {d: (family / d / "model.safetensors").stat().st_ino for d in ("tiny-9L", "tiny-10L")}

    _ok(*args)
    assert {d: (family / d / "model.safetensors").stat().st_ino for d in inodes} == inodes  # kept, not rewritten
    assert sorted(p.name for p in (family / "parts").iterdir()) == ["tiny-9L-10L-16L.json"]
    manifest = json.loads((family / "manifest.json").read_text())
    assert [e["directory"] for e in manifest["sizes"]] == ["tiny-9L", "tiny-10L", "tiny-16L"]
    _ok("verify", str(family))
