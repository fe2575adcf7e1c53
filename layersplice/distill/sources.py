"""Documents from where text lives: .txt files, JSON lines, parquet, a saved
`datasets` directory, or any dataset `datasets.load_dataset` can stream (hub).

Every corpus yields its documents in one fixed order and can start after the
first n of them without tokenizing anything: that is what makes resume exact.
A .txt file is one document; a JSON line or a table row is one document.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
            return _import("pyarrow.parquet").ParquetFile(self.path).metadata.num_rows
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
            yield self.path.read_text(encoding="utf-8", errors="replace")

    def _jsonl(self, start: int) -> Iterator[str]:
        index = 0
        with self.path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                index += 1
                if index > start:
                    yield self._text_of(_parse_json_line(line, self.path, number), f"line {number}")

    def _parquet(self, start: int) -> Iterator[str]:
        parquet = _import("pyarrow.parquet").ParquetFile(self.path)
        self._check_field(parquet.schema_arrow.names)
        skip = start
        for batch in parquet.iter_batches(batch_size=ROWS_PER_READ, columns=[self.text_field]):
            texts = batch.column(0).to_pylist()
            yield from (text or "" for text in texts[skip:])
            skip = max(0, skip - len(texts))

    def _saved(self) -> Any:
        loaded = _import("datasets").load_from_disk(str(self.path))
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
            yield from (text or "" for text in rows[first : first + ROWS_PER_READ][self.text_field])

    def _check_field(self, names: list[str]) -> None:
        if self.text_field not in names:
            raise DataError(
                f"{self.path}: no '{self.text_field}' column; pass --text-field with one of "
                f"{', '.join(names)}"
            )

    def _text_of(self, row: Any, where: str) -> str:
        if not isinstance(row, dict) or self.text_field not in row:
            fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"{self.path} {where}: no '{self.text_field}' field (found: {fields}); "
                "pass --text-field NAME"
            )
        text = row[self.text_field]
        if text is not None and not isinstance(text, str):
            raise DataError(
                f"{self.path} {where}: '{self.text_field}' is {type(text).__name__}, not text; "
                "pass --text-field with a text field"
            )
        return text or ""


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

    def documents(self, start: int = 0) -> Iterator[str]:
        datasets = _import("datasets")
        try:
            rows = datasets.load_dataset(
                self.name, self.config_name, split=self.split, streaming=True
            )
        except (FileNotFoundError, ValueError, ConnectionError) as error:
            raise DataError(
                f"--dataset {self.name} (split {self.split}) cannot be loaded: {first_line(error)}; "
                "check the name, --dataset-config and --split"
            ) from None
        for number, row in enumerate(rows.skip(start) if start else rows, start + 1):
            if self.text_field not in row:
                raise DataError(
                    f"--dataset {self.name} row {number}: no '{self.text_field}' field "
                    f"(found: {', '.join(row)}); pass --text-field NAME"
                )
            yield row[self.text_field] or ""


Corpus = FileCorpus | StreamedCorpus


def open_corpus(spec: DataSpec) -> Corpus:
    """The corpus a DataSpec names, with every path checked now rather than mid-run."""
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
