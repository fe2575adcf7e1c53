"""Every text source packs into the expected blocks; the stream is seeded and resumable."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_distill_support import make_tokenizer, sentences, write_jsonl

from layersplice.distill.config import DataError, DataSpec
from layersplice.distill.data import eos_tokenizer, load_data

SEQ_LEN = 16
DOCS = sentences(40, seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def expected_blocks(tokenizer, docs: list[str], val_docs: int) -> list[list[int]]:
    """Written out plainly: every document's tokens and EOS, concatenated, cut into blocks."""
    stream = []
    for text in docs[val_docs:]:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [stream[i : i + SEQ_LEN] for i in range(0, len(stream) - SEQ_LEN + 1, SEQ_LEN)]


def first_epoch(spec: DataSpec, tokenizer) -> list[list[int]]:
    data = load_data(spec, tokenizer, vocab_size=len(tokenizer))
    want = len(expected_blocks(tokenizer, DOCS, 4))
    return data.train.next_blocks(want).tolist()


def _txt(tmp_path):
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(DOCS):
        (tmp_path / "docs" / f"{i:03d}.txt").write_text(text)
    return DataSpec(files=(tmp_path / "docs",), seq_len=SEQ_LEN, val_fraction=0.1, shuffle_window=1)


def _jsonl(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", DOCS, field="body")
    return DataSpec(files=(path,), text_field="body", seq_len=SEQ_LEN, val_fraction=0.1, shuffle_window=1)


def _parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS, "id": list(range(len(DOCS)))}), tmp_path / "d.parquet", row_group_size=7)
    return DataSpec(files=(tmp_path / "d.parquet",), seq_len=SEQ_LEN, val_fraction=0.1, shuffle_window=1)


def _saved(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(tmp_path / "saved")
    return DataSpec(files=(tmp_path / "saved",), seq_len=SEQ_LEN, val_fraction=0.1, shuffle_window=1)


def _hub(tmp_path, monkeypatch):
    # A local dataset folder goes through the very load_dataset(..., streaming=True)
    # call that a hub name does; offline, so nothing can be fetched.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "hub" / "data" / "train.jsonl", DOCS)
    write_jsonl(tmp_path / "hub" / "data" / "test.jsonl", ["other split"])
    return DataSpec(dataset=str(tmp_path / "hub"), split="train", seq_len=SEQ_LEN, val_tokens=0, shuffle_window=1)


@pytest.mark.parametrize("source", ["txt", "jsonl", "parquet", "saved"])
def test_local_sources_pack_the_documents_after_the_validation_split(source, tmp_path, tokenizer):
    spec = {"txt": _txt, "jsonl": _jsonl, "parquet": _parquet, "saved": _saved}[source](tmp_path)
    assert first_epoch(spec, tokenizer) == expected_blocks(tokenizer, DOCS, val_docs=4)


def test_streamed_dataset_packs_its_split_offline(tmp_path, tokenizer, monkeypatch):
    spec = _hub(tmp_path, monkeypatch)
    data = load_data(spec, tokenizer, vocab_size=len(tokenizer))
    want = expected_blocks(tokenizer, DOCS, val_docs=0)
    assert data.train.next_blocks(len(want)).tolist() == want
    assert len(data.val.ids) == 0


def test_streamed_dataset_errors_name_the_fix(tmp_path, tokenizer, monkeypatch):
    spec = _hub(tmp_path, monkeypatch)
    with pytest.raises(DataError, match=r"Bad split: validation.*check the name, --dataset-config and --split"):
        load_data(dataclasses.replace(spec, split="validation"), tokenizer, len(tokenizer))
    with pytest.raises(DataError, match=r"row 1: no 'body' field \(found: text\); pass --text-field"):
        load_data(dataclasses.replace(spec, text_field="body"), tokenizer, len(tokenizer))


def test_validation_holds_the_first_documents_up_to_the_token_budget(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    encode = eos_tokenizer(tokenizer)
    first_two = sum(encode(DOCS[:2]), [])
    spec = DataSpec(files=(path,), seq_len=SEQ_LEN, val_tokens=len(encode(DOCS[:1])[0]) + 1, shuffle_window=1)
    data = load_data(spec, tokenizer, vocab_size=len(tokenizer))
    held = data.val.ids[data.val.mask].tolist()
    assert held == first_two[: spec.val_tokens]
    assert data.val.padded and not data.val.mask[-1, -1]
    assert data.train.next_blocks(1).tolist() == expected_blocks(tokenizer, DOCS, val_docs=2)[:1]


def test_missing_text_field_names_the_file_the_line_and_the_fix(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl line 1: no 'text' field \(found: content\); pass --text-field"):
        load_data(DataSpec(files=(path,), seq_len=SEQ_LEN), tokenizer, len(tokenizer))


def test_unsupported_and_missing_paths_are_user_errors(tmp_path, tokenizer):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_data(DataSpec(files=(tmp_path / "d.csv",)), tokenizer, len(tokenizer))
    with pytest.raises(DataError, match="no such file"):
        load_data(DataSpec(files=(tmp_path / "nope.txt",)), tokenizer, len(tokenizer))


def test_too_little_data_for_one_block_is_a_user_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ["tiny", "data"])
    data = load_data(DataSpec(files=(path,), seq_len=SEQ_LEN, val_tokens=0), tokenizer, len(tokenizer))
    with pytest.raises(DataError, match="less than one --seq-len 16 block"):
        data.train.next_blocks(1)


FEW = sentences(6, seed=5)


def _stream(tmp_path, tokenizer, seed: int):
    path = tmp_path / "few.jsonl"
    if not path.exists():
        write_jsonl(path, FEW)
    spec = DataSpec(files=(path,), seq_len=SEQ_LEN, val_tokens=0, shuffle_window=5, seed=seed)
    return load_data(spec, tokenizer, len(tokenizer)).train


def test_shuffled_windows_are_permutations_of_the_packed_blocks(tmp_path, tokenizer):
    blocks = expected_blocks(tokenizer, FEW, val_docs=0)
    stream = _stream(tmp_path, tokenizer, seed=0)
    two_windows = stream.next_blocks(10).tolist()
    assert two_windows != blocks[:10]
    assert sorted(two_windows[:5]) == sorted(blocks[:5])
    assert sorted(two_windows[5:]) == sorted(blocks[5:10])
    assert _stream(tmp_path, tokenizer, seed=0).next_blocks(10).tolist() == two_windows
    assert _stream(tmp_path, tokenizer, seed=1).next_blocks(10).tolist() != two_windows


def test_a_fresh_stream_state_restores_to_the_start(tmp_path, tokenizer):
    fresh = _stream(tmp_path, tokenizer, seed=4)
    restored = _stream(tmp_path, tokenizer, seed=4)
    restored.load_state_dict(fresh.state_dict())
    assert torch.equal(restored.next_blocks(7), fresh.next_blocks(7))


def test_a_restored_stream_continues_exactly_across_windows_and_epochs(tmp_path, tokenizer):
    epoch = len(expected_blocks(tokenizer, FEW, val_docs=0))
    assert epoch % 5, "an epoch that ends inside a window is the harder case"
    for taken in (1, 3, 5, 7, epoch - 1, epoch + 2):
        uninterrupted = _stream(tmp_path, tokenizer, seed=4)
        uninterrupted.next_blocks(taken)
        state = json.loads(json.dumps(uninterrupted.state_dict()))
        resumed = _stream(tmp_path, tokenizer, seed=4)
        resumed.load_state_dict(state)
        assert torch.equal(resumed.next_blocks(2 * epoch), uninterrupted.next_blocks(2 * epoch)), taken


def test_every_epoch_serves_each_block_once(tmp_path, tokenizer):
    blocks = expected_blocks(tokenizer, FEW, val_docs=0)
    stream = _stream(tmp_path, tokenizer, seed=2)
    served = stream.next_blocks(2 * len(blocks)).tolist()
    windows_of_first_epoch = len(blocks) // 5 * 5
    assert sorted(served[:windows_of_first_epoch]) == sorted(blocks[:windows_of_first_epoch])
    assert sorted(served) == sorted(blocks + blocks)


def test_synthetic_blocks_depend_only_on_the_seed():
    spec = DataSpec(synthetic=True, seq_len=SEQ_LEN, val_tokens=40, seed=7)
    one, two = load_data(spec, None, 50), load_data(spec, None, 50)
    assert one.val.ids.shape == (3, SEQ_LEN)
    assert torch.equal(one.train.next_blocks(4), two.train.next_blocks(4))
    assert not torch.equal(one.val.ids[:1], one.train.next_blocks(1))
