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


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tokenizer):
    """FEW (val_tokens 0), tokenized by `layersplice tokenize`, and the raw spec it came from."""
    from click.testing import CliRunner

    from layersplice.cli.main import cli

    root = tmp_path_factory.mktemp("tokenized")
    tokenizer.save_pretrained(root / "teacher")
    path = write_jsonl(root / "few.jsonl", FEW)
    args = ["tokenize", "--teacher", str(root / "teacher"), "--data", str(path), "--out", str(root / "tokens"),
            "--seq-len", str(SEQ_LEN), "--val-tokens", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return root / "tokens", DataSpec(files=(path,), seq_len=SEQ_LEN, val_tokens=0, seed=4)


def _token_stream(tokens_dir, tokenizer, seed: int = 4):
    return load_data(DataSpec(files=(tokens_dir,), seq_len=SEQ_LEN, seed=seed), tokenizer, len(tokenizer)).train


def test_tokenized_data_serves_every_block_once_an_epoch_in_a_seeded_order(tokenized, tokenizer):
    blocks = expected_blocks(tokenizer, FEW, val_docs=0)
    stream = _token_stream(tokenized[0], tokenizer)
    epochs = [stream.next_blocks(len(blocks)).tolist() for _ in range(3)]
    for served in epochs:
        assert sorted(served) == sorted(blocks)
    assert epochs[0] != blocks and epochs[0] != epochs[1]
    assert _token_stream(tokenized[0], tokenizer).next_blocks(2 * len(blocks)).tolist() == epochs[0] + epochs[1]
    assert _token_stream(tokenized[0], tokenizer, seed=5).next_blocks(len(blocks)).tolist() != epochs[0]


def test_raw_text_shuffled_in_windows_of_one_epoch_gives_the_tokenized_blocks_in_the_same_order(tokenized, tokenizer):
    tokens_dir, raw_spec = tokenized
    epoch = len(expected_blocks(tokenizer, FEW, val_docs=0))
    raw = load_data(dataclasses.replace(raw_spec, shuffle_window=epoch), tokenizer, len(tokenizer)).train
    assert torch.equal(raw.next_blocks(3 * epoch + 2), _token_stream(tokens_dir, tokenizer).next_blocks(3 * epoch + 2))


@pytest.mark.parametrize("processes", [2, 4])
def test_each_process_reads_its_own_share_of_the_global_batch(tokenized, tokenizer, processes):
    batch, steps = 8, 5
    whole = _token_stream(tokenized[0], tokenizer)
    global_batches = [whole.next_blocks(batch) for _ in range(steps)]
    ranks = [_token_stream(tokenized[0], tokenizer) for _ in range(processes)]
    for expected in global_batches:
        shares = [stream.next_share(batch, rank, processes) for rank, stream in enumerate(ranks)]
        assert torch.equal(torch.cat(shares), expected)


def test_a_tokenized_stream_resumes_from_its_position_alone(tokenized, tokenizer):
    epoch = len(expected_blocks(tokenizer, FEW, val_docs=0))
    for taken in (1, epoch - 1, epoch + 3):
        uninterrupted = _token_stream(tokenized[0], tokenizer)
        uninterrupted.next_blocks(taken)
        state = json.loads(json.dumps(uninterrupted.state_dict()))
        assert state["served"] == taken
        resumed = _token_stream(tokenized[0], tokenizer)
        resumed.load_state_dict(state)
        assert torch.equal(resumed.next_blocks(2 * epoch), uninterrupted.next_blocks(2 * epoch)), taken
    with pytest.raises(DataError, match="trained on other data than this --data"):
        _token_stream(tokenized[0], tokenizer).load_state_dict({"served": 3, "tokens": "sha256:other"})


@pytest.mark.parametrize("files", [2, 3], ids=["whole-files-per-process", "every-other-document"])
def test_a_streamed_dataset_is_split_between_processes_without_the_held_out_documents(
        files, tmp_path, tokenizer, monkeypatch):
    from layersplice.distill.sources import StreamedCorpus, StreamShare

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    per_file = -(-len(DOCS) // files)
    for i in range(files):
        write_jsonl(tmp_path / "hub" / "data" / f"train-{i}.jsonl", DOCS[i * per_file : (i + 1) * per_file])
    corpus = StreamedCorpus(str(tmp_path / "hub"), None, "train", "text")
    held = 5
    shares = [list(StreamShare(corpus, rank, 2, held_out=held).documents(0)) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(DOCS[held:])
    for share in shares:  # each process's documents keep the stream's order
        assert [DOCS.index(text) for text in share] == sorted(DOCS.index(text) for text in share)
    assert list(StreamShare(corpus, 1, 2, held_out=held).documents(3)) == shares[1][3:]

    spec = DataSpec(dataset=str(tmp_path / "hub"), seq_len=SEQ_LEN, shuffle_window=1,
                    val_tokens=sum(len(ids) for ids in eos_tokenizer(tokenizer)(DOCS[:held])))
    for rank in range(2):
        data = load_data(spec, tokenizer, len(tokenizer), rank=rank, processes=2)
        assert data.held_documents == held
        own = [ids for ids in eos_tokenizer(tokenizer)(shares[rank])]
        stream = sum(own, [])
        assert data.train.next_share(8, rank, 2).tolist() == [stream[i : i + SEQ_LEN] for i in range(0, 4 * SEQ_LEN, SEQ_LEN)]


def _bad_txt(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"first line\nsecond line\nthird \xff line\n")
    return path, r"d.txt line 3: byte 0xff is not UTF-8 text; convert the file to UTF-8"


def _bad_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS[:3])
    path.write_bytes(path.read_bytes() + b'{"text": "caf\xe9"}\n')
    return path, r"d.jsonl line 4: byte 0xe9 is not UTF-8 text"


def _missing_last_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    path.write_text(path.read_text() + json.dumps({"body": "x"}) + "\n")
    return path, r"d.jsonl line 41: no 'text' field \(found: body\); pass --text-field NAME"


def _text_named_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("this is text, not parquet\n")
    return path, r"d.parquet: not a readable parquet file \(.*\); replace or remove it"


def _numbers_in_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": list(range(5))}), tmp_path / "d.parquet")
    return tmp_path / "d.parquet", r"d.parquet row 1: 'text' is int, not text"


@pytest.mark.parametrize("case", [_bad_txt, _bad_jsonl, _missing_last_field, _text_named_parquet, _numbers_in_parquet],
                         ids=["txt-not-utf8", "jsonl-not-utf8", "jsonl-missing-field-last-line", "text-named-parquet",
                              "parquet-numbers"])
def test_every_document_is_checked_before_training_and_a_bad_one_is_named(case, tmp_path, tokenizer):
    from layersplice.distill.survey import survey_data

    path, message = case(tmp_path)
    with pytest.raises(DataError, match=message):
        survey_data(DataSpec(files=(path,), seq_len=SEQ_LEN, val_tokens=0), tmp_path, tokenizer)


def test_the_survey_counts_documents_tokens_held_out_and_blocks(tmp_path, tokenizer):
    from layersplice.distill.survey import survey_data

    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    lengths = [len(ids) for ids in eos_tokenizer(tokenizer)(DOCS)]
    budget = lengths[0] + lengths[1] + 1  # two whole documents and one token of the third
    counts = survey_data(DataSpec(files=(path,), seq_len=SEQ_LEN, val_tokens=budget), tmp_path, tokenizer).counts
    assert (counts.documents, counts.tokens) == (len(DOCS), sum(lengths))
    assert (counts.held_documents, counts.held_tokens) == (3, budget)
    assert counts.blocks == sum(lengths[3:]) // SEQ_LEN == len(expected_blocks(tokenizer, DOCS, val_docs=3))


def test_the_feed_records_the_position_of_the_steps_taken_not_of_the_batch_made_ahead(tmp_path, tokenizer):
    from layersplice.distill.feed import Feed, restore
    from layersplice.distill.parallel import World

    world = World(0, 1, torch.device("cpu"))
    stream = _stream(tmp_path, tokenizer, seed=4)
    feed = Feed(stream, batch_size=3, micro_batch_size=2, world=world, steps=3)
    taken = [feed.next()[0] for _ in range(2)]
    state = json.loads(json.dumps(feed.state_dict()))  # the third batch is being made meanwhile
    taken.append(feed.next()[0])
    feed.close()
    assert [[tuple(b.ids.shape) for b in step] for step in taken] == [[(2, SEQ_LEN), (1, SEQ_LEN)]] * 3

    reference = _stream(tmp_path, tokenizer, seed=4)
    served = reference.next_blocks(9)
    assert torch.equal(torch.cat([b.ids for step in taken for b in step]), served)
    assert stream.state_dict() == reference.state_dict(), "no batch is made beyond the run's steps"
    resumed = _stream(tmp_path, tokenizer, seed=4)
    restore(resumed, state, world)
    assert torch.equal(resumed.next_blocks(3), served[6:])


def test_a_streamed_run_resumes_only_with_the_processes_it_was_split_between(tmp_path, tokenizer, monkeypatch):
    from layersplice.distill.feed import Feed, restore
    from layersplice.distill.parallel import World

    spec = _hub(tmp_path, monkeypatch)
    one = World(0, 1, torch.device("cpu"))
    feed = Feed(load_data(spec, tokenizer, len(tokenizer)).train, batch_size=2, micro_batch_size=2, world=one, steps=1)
    feed.next()
    state = feed.state_dict()
    feed.close()
    assert list(state) == ["processes"] and len(state["processes"]) == 1
    with pytest.raises(DataError, match="split between 1 processes and cannot continue with 2; resume with 1"):
        restore(load_data(spec, tokenizer, len(tokenizer), 0, 2).train, state, World(0, 2, torch.device("cpu")))


def test_a_tokenize_output_that_does_not_fit_the_run_is_refused_naming_the_fix(tokenized, tokenizer, tmp_path):
    from layersplice.distill.sources import open_corpus
    from layersplice.distill.survey import survey_data

    tokens_dir, raw_spec = tokenized
    teacher = tokens_dir.parent / "teacher"
    spec = DataSpec(files=(tokens_dir,), seq_len=SEQ_LEN)
    assert survey_data(spec, teacher, tokenizer).counts.blocks == len(expected_blocks(tokenizer, FEW, val_docs=0))
    with pytest.raises(DataError, match=f"holds blocks of {SEQ_LEN} tokens, not --seq-len 32; pass --seq-len {SEQ_LEN}"):
        survey_data(dataclasses.replace(spec, seq_len=32), teacher, tokenizer)
    with pytest.raises(DataError, match="is tokenized, with its validation split made then .*drop --val-tokens"):
        survey_data(dataclasses.replace(spec, val_tokens=5), teacher, tokenizer)
    make_tokenizer(vocab_size=300).save_pretrained(tmp_path / "other")
    with pytest.raises(DataError, match="was tokenized with the tokenizer of .*differ from --teacher"):
        survey_data(spec, tmp_path / "other", tokenizer)
    with pytest.raises(DataError, match="is a tokenize output: give it as the only --data"):
        survey_data(dataclasses.replace(spec, files=(tokens_dir, *raw_spec.files)), teacher, tokenizer)
    with pytest.raises(DataError, match="is already tokenized"):
        open_corpus(spec)
