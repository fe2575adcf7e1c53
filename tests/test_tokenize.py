"""`layersplice tokenize`: distill's blocks, written once, sealed, verified; bad text refused before writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from hub_support import put_snapshot
from test_distill_support import make_tokenizer, sentences, write_jsonl

from layersplice.checkpoint.sealed_json import write_sealed
from layersplice.cli.main import cli

SEQ_LEN = 16
COMMIT = "d" * 40
DOCS = sentences(60, seed=8)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A directory holding only a tokenizer: all tokenize reads of the teacher."""
    path = tmp_path_factory.mktemp("tok") / "teacher"
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def tokenize(teacher_dir, data, out, *extra):
    result = invoke("tokenize", "--teacher", teacher_dir, "--data", data, "--out", out, "--seq-len", SEQ_LEN, *extra)
    assert result.exit_code == 0, result.output
    return result


def written_out(tokenizer, docs: list[str]) -> list[list[int]]:
    """Each document's ids and EOS, plainly: the reference the files are compared with."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in docs]


def test_tokenize_writes_distills_validation_split_and_blocks_and_verifies(teacher_dir, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "tokens"
    tokenize(teacher_dir, data, out, "--val-tokens", 50, "--num-proc", 2)

    encoded = written_out(tokenizer, DOCS)
    held = 0
    while sum(map(len, encoded[:held])) < 50:
        held += 1
    train = sum(encoded[held:], [])
    blocks = len(train) // SEQ_LEN
    assert np.fromfile(out / "val.bin", dtype="<u2").tolist() == sum(encoded[:held], [])[:50]
    assert np.fromfile(out / "train.bin", dtype="<u2").tolist() == train[: blocks * SEQ_LEN]
    record = json.loads((out / "layersplice.json").read_text())
    assert record["kind"] == "tokens" and record["seq_len"] == SEQ_LEN and record["dtype"] == "uint16"
    assert record["validation"]["documents"] == held and record["validation"]["tokens"] == 50
    assert record["train"] == {"documents": len(DOCS) - held, "tokens": len(train), "blocks": blocks}
    assert record["documents"] == len(DOCS) and record["tokens"] == sum(map(len, encoded))
    assert record["tokenizer"]["files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert record["sources"]["data"][0]["path"] == str(data)

    verified = invoke("verify", out)
    assert verified.exit_code == 0, verified.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "tokens"]  # no temporaries left


def test_the_number_of_processes_does_not_change_a_byte(teacher_dir, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", DOCS * 3)
    tokenize(teacher_dir, data, tmp_path / "one", "--num-proc", 1, "--val-fraction", 0.1)
    tokenize(teacher_dir, data, tmp_path / "two", "--num-proc", 2, "--val-fraction", 0.1)
    for name in ("train.bin", "val.bin", "layersplice.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def _forge_token(out, value: int) -> None:
    """Write `value` as the first training token and re-seal the record over the new bytes."""
    from layersplice.output.family import file_record

    train = np.fromfile(out / "train.bin", dtype="<u2")
    train[0] = value
    train.tofile(out / "train.bin")
    record = json.loads((out / "layersplice.json").read_text())
    record["files"]["train.bin"] = file_record(out / "train.bin")
    write_sealed(out / "layersplice.json", record)


def test_verify_names_a_changed_byte_a_stray_file_and_an_id_outside_the_vocabulary(teacher_dir, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "tokens"
    tokenize(teacher_dir, data, out, "--val-tokens", 40)
    pristine = (out / "train.bin").read_bytes()

    (out / "train.bin").write_bytes(pristine[:10] + bytes([pristine[10] ^ 1]) + pristine[11:])
    result = invoke("verify", out)
    assert result.exit_code == 2 and "train.bin: blake3 does not match" in result.output

    (out / "train.bin").write_bytes(pristine[:-2])
    result = invoke("verify", out)
    assert result.exit_code == 2 and "the file was cut short or changed" in result.output

    (out / "train.bin").write_bytes(pristine)
    (out / "notes.bin").write_bytes(b"")
    result = invoke("verify", out)
    assert result.exit_code == 2 and "notes.bin: not listed in" in result.output
    (out / "notes.bin").unlink()

    _forge_token(out, 320)  # the tokenizer has 320 ids
    result = invoke("verify", out)
    assert result.exit_code == 2 and "token id 320 lies outside the 320-token vocabulary" in result.output


def test_undecodable_text_is_refused_in_one_line_before_anything_is_written(teacher_dir, tmp_path):
    good = write_jsonl(tmp_path / "docs.jsonl", DOCS).read_bytes()
    lines = good.splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(lines[:40]) + lines[40].replace(b"\": \"", b"\": \"\xe9") + b"".join(lines[41:]))
    out = tmp_path / "tokens"
    result = invoke("tokenize", "--teacher", teacher_dir, "--data", bad, "--out", out)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith(f"error: {bad} line 41: byte 0xe9 is not UTF-8 text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "docs.jsonl"]


def test_an_output_inside_the_data_is_refused(teacher_dir, tmp_path):
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "docs.jsonl", DOCS)
    result = invoke("tokenize", "--teacher", teacher_dir, "--data", tmp_path / "corpus",
                    "--out", tmp_path / "corpus" / "tokens")
    assert result.exit_code == 2 and "lies inside --data" in result.output
    assert [p.name for p in (tmp_path / "corpus").iterdir()] == ["docs.jsonl"]


def _tokenize_offline(cache, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "layersplice", "tokenize", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_a_hub_teacher_resolves_from_the_cache_and_a_local_copy_is_named_by_its_declared_id(teacher_dir, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    cache = tmp_path / "cache"
    put_snapshot(cache, "org/teacher", COMMIT, teacher_dir)
    split = ("--val-tokens", 50, "--num-proc", 1)
    tokenize(teacher_dir, data, tmp_path / "local", *split)
    from_hub = _tokenize_offline(cache, "--teacher", "org/teacher", "--data", data, "--out", tmp_path / "hub",
                                 "--seq-len", SEQ_LEN, *split)
    assert from_hub.returncode == 0, from_hub.stderr[-3000:]
    tokenize(teacher_dir, data, tmp_path / "declared", "--teacher-id", "org/teacher", "--teacher-revision", "v1", *split)

    records = {name: json.loads((tmp_path / name / "layersplice.json").read_text())["tokenizer"]
               for name in ("local", "hub", "declared")}
    assert (records["local"]["from"], records["local"]["revision"]) == (str(teacher_dir), None)
    assert (records["hub"]["from"], records["hub"]["revision"]) == ("org/teacher", COMMIT)  # the commit read
    assert (records["declared"]["from"], records["declared"]["revision"]) == ("org/teacher", "v1")
    assert len({record["digest"] for record in records.values()}) == 1  # one tokenizer: distill takes each
    for name in ("hub", "declared"):
        for blocks in ("train.bin", "val.bin"):
            assert (tmp_path / name / blocks).read_bytes() == (tmp_path / "local" / blocks).read_bytes()
        assert invoke("verify", tmp_path / name).exit_code == 0

    missing = _tokenize_offline(cache, "--teacher", "org/absent", "--data", data, "--out", tmp_path / "never")
    assert missing.returncode == 2 and not (tmp_path / "never").exists()
    assert missing.stderr.splitlines() == [
        "error: --teacher org/absent: not a local directory and not in the Hugging Face cache (offline mode or no "
        "network); download it first or unset HF_HUB_OFFLINE"
    ]
    mistaken = invoke("tokenize", "--teacher", teacher_dir, "--teacher-id", "not a repo", "--data", data,
                      "--out", tmp_path / "never")
    assert mistaken.exit_code == 2 and not (tmp_path / "never").exists()
    assert mistaken.output.strip().splitlines() == [
        "error: --teacher-id 'not a repo': not a Hub repo id; give OWNER/NAME, e.g. Qwen/Qwen3-4B-Base"]
