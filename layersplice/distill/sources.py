"""Documents from where text lives: .txt files, JSON lines, parquet, a saved
`datasets` directory, or any dataset `datasets.load_dataset` can stream (hub).

Every corpus yields its documents in one fixed order and can start after the
first n of them without tokenizing anything: that is what makes resume exact.
A .txt file is one document; a JSON line or a table row is one document.
Text must decode as UTF-8 and every row must hold the text field: anything
else is a DataError naming the file and line (or row), never a silent
replacement character or a library traceback.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layersplice.checkpoint.token_shards import is_token_dir
from layersplice.distill.config import DataError, DataSpec, first_line

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
ROWS_PER_READ = 1024


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"reading this data needs the '{module}' package: pip install datasets"
        ) from None


@dataclass(frozen=True)
class FileSource:
    """One local file or saved dataset, read in full order."""

    path: Path
    text_field: str
    split: str

    @property
    def kind(self) -> str:
        if self.path.is_dir():
            return "saved"
        if self.path.suffix in TEXT_SUFFIXES:
            return "txt"
        if self.path.suffix in JSONL_SUFFIXES:
            return "jsonl"
        return "parquet"

    def count(self) -> int:
        if self.kind == "txt":
            return 1
        if self.kind == "jsonl":
            with self.path.open("rb") as f:
                return sum(1 for line in f if line.strip())
        if self.kind == "parquet":
            return self._parquet_file().metadata.num_rows
        return len(self._saved())

    def documents(self, start: int) -> Iterator[str]:
        readers = {
            "txt": self._txt,
            "jsonl": self._jsonl,
            "parquet": self._parquet,
            "saved": self._saved_rows,
        }
        return readers[self.kind](start)

    def _txt(self, start: int) -> Iterator[str]:
        if start == 0:
            data = self.path.read_bytes()
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(self.path, data.count(b"\n", 0, error.start) + 1, error) from None

    def _jsonl(self, start: int) -> Iterator[str]:
        index = 0
        with self.path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                index += 1
                if index > start:
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as error:
                        raise _not_utf8(self.path, number, error) from None
                    yield self._text_of(_parse_json_line(line, self.path, number), f"line {number}")

    def _parquet(self, start: int) -> Iterator[str]:
        parquet = self._parquet_file()
        self._check_field(parquet.schema_arrow.names)
        skip, row = start, 0
        try:
            for batch in parquet.iter_batches(batch_size=ROWS_PER_READ, columns=[self.text_field]):
                texts = batch.column(0).to_pylist()
                for number, text in enumerate(texts[skip:], row + skip + 1):
                    yield self._text(text, f"row {number}")
                row += len(texts)
                skip = max(0, skip - len(texts))
        except _import("pyarrow").ArrowException as error:
            raise self._unreadable("parquet file", error) from None

    def _parquet_file(self) -> Any:
        try:
            return _import("pyarrow.parquet").ParquetFile(self.path)
        except (_import("pyarrow").ArrowException, OSError) as error:
            raise self._unreadable("parquet file", error) from None

    def _unreadable(self, what: str, error: BaseException) -> DataError:
        return DataError(f"{self.path}: not a readable {what} ({first_line(error)}); replace or remove it")

    def _saved(self) -> Any:
        try:
            loaded = _import("datasets").load_from_disk(str(self.path))
        except (_import("pyarrow").ArrowException, OSError, ValueError) as error:
            raise self._unreadable("saved dataset (datasets' save_to_disk)", error) from None
        if hasattr(loaded, "keys"):
            if self.split not in loaded:
                raise DataError(
                    f"{self.path}: no split '{self.split}'; pass --split with one of "
                    f"{', '.join(sorted(loaded.keys()))}"
                )
            loaded = loaded[self.split]
        self._check_field(loaded.column_names)
        return loaded

    def _saved_rows(self, start: int) -> Iterator[str]:
        rows = self._saved().select_columns([self.text_field])
        for first in range(start, len(rows), ROWS_PER_READ):
            texts = rows[first : first + ROWS_PER_READ][self.text_field]
            yield from (self._text(text, f"row {n}") for n, text in enumerate(texts, first + 1))

    def _check_field(self, names: list[str]) -> None:
        if self.text_field not in names:
            raise DataError(
                f"{self.path}: no '{self.text_field}' column; pass --text-field with one of "
                f"{', '.join(names)}"
            )

    def _text_of(self, row: Any, where: str) -> str:
        return checked_text(row, self.text_field, f"{self.path} {where}")

    def _text(self, text: Any, where: str) -> str:
        return checked_text({self.text_field: text}, self.text_field, f"{self.path} {where}")


def checked_text(row: Any, field: str, where: str) -> str:
    """The text of one row (a missing value is an empty document); a DataError saying `where` otherwise."""
    if not isinstance(row, dict) or field not in row:
        fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: no '{field}' field (found: {fields}); pass --text-field NAME")
    text = row[field]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: '{field}' is {type(text).__name__}, not text; pass --text-field with a text field")
    return text or ""


def _not_utf8(path: Path, line: int, error: UnicodeDecodeError) -> DataError:
    byte = error.object[error.start]
    return DataError(
        f"{path} line {line}: byte 0x{byte:02x} is not UTF-8 text; convert the file to UTF-8 "
        "(e.g. iconv -f latin1 -t utf-8) or remove it"
    )


def _parse_json_line(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path} line {number}: not JSON ({error.msg}); give one JSON object a line") from None


class FileCorpus:
    """Local files and saved datasets, one after the other, in the order given."""

    def __init__(self, sources: list[FileSource]) -> None:
        self.sources = sources
        self.counts = [source.count() for source in sources]

    def __len__(self) -> int:
        return sum(self.counts)

    def documents(self, start: int = 0) -> Iterator[str]:
        for source, count in zip(self.sources, self.counts):
            if start < count:
                yield from source.documents(start)
            start = max(0, start - count)


class StreamedCorpus:
    """A dataset streamed by `datasets.load_dataset`: a hub name or a local dataset folder."""

    def __init__(self, name: str, config_name: str | None, split: str, text_field: str) -> None:
        self.name, self.config_name, self.split, self.text_field = name, config_name, split, text_field

    def rows(self) -> Any:
        """The dataset as a `datasets` IterableDataset."""
        datasets = _import("datasets")
        # A file it cannot parse is also logged, over several lines; the DataError says it in one.
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        try:
            return datasets.load_dataset(self.name, self.config_name, split=self.split, streaming=True)
        except (FileNotFoundError, ValueError, ConnectionError) as error:
            raise DataError(
                f"--dataset {self.name} (split {self.split}) cannot be loaded: {first_line(error)}; "
                "check the name, --dataset-config and --split"
            ) from None

    def documents(self, start: int = 0) -> Iterator[str]:
        rows = self.rows()
        return self.texts(rows.skip(start) if start else rows, start, lambda n: f"row {n}")

    def texts(self, rows: Any, start: int, where: Callable[[int], str]) -> Iterator[str]:
        """The text of each row; a DataError naming the document (`where(number)`) for a bad one."""
        number = start
        try:
            for number, row in enumerate(rows, start + 1):
                yield checked_text(row, self.text_field, f"--dataset {self.name} {where(number)}")
        except (ValueError, OSError, _import("pyarrow").ArrowException,
                _import("datasets").exceptions.DatasetsError) as error:
            raise DataError(
                f"--dataset {self.name} {where(number + 1)}: cannot be read ({first_line(error)}); "
                "fix or drop that part of the dataset"
            ) from None


class StreamShare:
    """One process's share of a streamed dataset's training documents.

    `datasets.distributed.split_dataset_by_node` gives each process its own
    documents (whole files when they divide evenly between the processes,
    else every n-th document), so no two processes read or tokenize the same
    one. The held-out documents, the first of the whole stream, come first
    in each share as well; each process drops the documents at the head of
    its share that are among them (by content digest), so that validation
    text never reaches training, however the split fell.
    """

    def __init__(self, corpus: StreamedCorpus, rank: int, processes: int, held_out: int) -> None:
        self.corpus, self.rank, self.processes, self.held_out = corpus, rank, processes, held_out
        self._head: int | None = None  # held-out documents at the head of this share

    def _rows(self) -> Any:
        split_dataset_by_node = _import("datasets.distributed").split_dataset_by_node
        return split_dataset_by_node(self.corpus.rows(), rank=self.rank, world_size=self.processes)

    def _where(self, number: int) -> str:
        return f"document {number} of process {self.rank}'s share ({self.processes} processes)"

    def _held_head(self) -> int:
        held = Counter(map(_digest, itertools.islice(self.corpus.documents(0), self.held_out)))
        head = 0
        for text in self.corpus.texts(self._rows(), 0, self._where):
            key = _digest(text)
            if not held[key]:
                break
            held[key] -= 1
            head += 1
        return head

    def documents(self, start: int = 0) -> Iterator[str]:
        if self._head is None:
            self._head = self._held_head()
        # Skipped here rather than by IterableDataset.skip, which counts the
        # documents of the whole stream once it is split (datasets 5.2).
        texts = self.corpus.texts(self._rows(), 0, self._where)
        return itertools.islice(texts, self._head + start, None)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


Corpus = FileCorpus | StreamedCorpus


def tokenized_input(spec: DataSpec) -> Path | None:
    """The `layersplice tokenize` output among --data, if one is given; it must be the only --data."""
    found = [Path(path) for path in spec.files if is_token_dir(Path(path))]
    if found and len(spec.files) > 1:
        raise DataError(
            f"--data {found[0]} is a tokenize output: give it as the only --data (tokenize "
            "every text source into one output)"
        )
    return found[0] if found else None


def open_corpus(spec: DataSpec) -> Corpus:
    """The corpus a DataSpec names, with every path checked now rather than mid-run."""
    if tokenized_input(spec) is not None:
        raise DataError(
            f"--data {tokenized_input(spec)} is already tokenized (a layersplice tokenize output); "
            "give the text it was made from, or use it with distill --data"
        )
    if spec.dataset is not None:
        return StreamedCorpus(spec.dataset, spec.dataset_config, spec.split, spec.text_field)
    sources: list[FileSource] = []
    for path in spec.files:
        sources.extend(FileSource(p, spec.text_field, spec.split) for p in _expand(Path(path)))
    return FileCorpus(sources)


def _expand(path: Path) -> list[Path]:
    supported = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    if not path.exists():
        raise DataError(f"--data {path}: no such file or directory")
    if path.is_dir():
        if any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
            return [path]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in supported)
        if not files:
            raise DataError(
                f"--data {path}: no .txt, .jsonl or .parquet files inside and not a saved "
                "dataset (datasets' save_to_disk)"
            )
        return files
    if path.suffix not in supported:
        raise DataError(
            f"--data {path}: unsupported file type '{path.suffix}'; give .txt, .jsonl or "
            ".parquet files, a saved dataset directory, or --dataset NAME"
        )
    return [path]
