"""Open a checkpoint (local directory or Hugging Face repo id) from its headers only."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from blake3 import blake3

from layersplice.checkpoint.bounded import CONFIG_LIMIT, INDEX_LIMIT, read_bounded
from layersplice.checkpoint.digest import CHECKSUM, blake3_fd, blake3_file
from layersplice.checkpoint.pickle_weights import PICKLE_INDEX, convert_to_safetensors, pickle_files
from layersplice.checkpoint.safetensors_format import TensorInfo, read_header
from layersplice.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# Files a model directory carries beside its weights, copied from the model
# that supplies the embeddings.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
COMMIT = re.compile(r"[0-9a-f]{40}")
COMMIT_KEY = "commit"  # with CHECKSUM, the keys of Checkpoint.identity()
# README.md: the model card, whose license the cards of layersplice outputs pass on.
CARD_FILE = "README.md"
HUB_PATTERNS = [CONFIG_FILE, INDEX_FILE, "*.safetensors", "student_config.json", CARD_FILE, *SIDE_FILES]


@dataclass(frozen=True)
class Checkpoint:
    """A model directory seen through its config and safetensors headers."""

    reference: str
    directory: Path
    config: dict
    tensors: dict[str, TensorInfo]
    files: tuple[Path, ...]
    revision: str | None = None
    index_metadata: dict = field(default_factory=dict)
    hub_id: str | None = None  # the Hub repo a local copy was declared to be (declare_hub_id)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def from_hub(self) -> bool:
        """Named by a Hub repo id (resolved through the cache), not by a local path."""
        return read_from_hub(self.reference, self.directory)

    @property
    def hub_name(self) -> str | None:
        """The Hub repo id this model is: the one it was read from, or the one declared for a local copy."""
        return self.reference if self.from_hub else self.hub_id

    @property
    def commit(self) -> str | None:
        """The commit a Hub id resolved to (the name of its snapshot folder in the cache); None for a local path."""
        return pinned_revision(self.reference, self.directory, None)

    def identity(self, weights_fd: Callable[[Path], int] | None = None) -> dict[str, str]:
        """What pins its bytes, for records that must tell two sources apart: the commit of a
        Hub id, or for a local directory a BLAKE3 digest over every file a build reads
        (weights, config, index, tokenizer, card), which reads all of them once.
        `weights_fd` opens the weight files where a build keeps them open anyway."""
        if self.commit is not None:
            return {COMMIT_KEY: self.commit}

        def digest(path: Path) -> str:
            return blake3_fd(weights_fd(path)) if weights_fd and path in self.files else blake3_file(path)

        names = {CONFIG_FILE, INDEX_FILE, "student_config.json", CARD_FILE, *SIDE_FILES}
        paths = sorted({*self.files, *(self.directory / n for n in names if (self.directory / n).is_file())})
        listing = "".join(f"{path.name} {path.stat().st_size} {digest(path)}\n" for path in paths)
        return {CHECKSUM: blake3(listing.encode()).hexdigest()}

    def describe(self) -> dict:
        """Where it came from, as provenance records list each source."""
        described = {"reference": self.reference, "revision": self.revision, "directory": str(self.directory)}
        return {**described, "hub_id": self.hub_id} if self.hub_id else described


def declare_hub_id(checkpoint: Checkpoint, hub_id: str | None, option: str) -> Checkpoint:
    """The checkpoint as a copy of the Hub repo `hub_id` (given by `option`), so cards can name it."""
    declared, revision = declared_copy(checkpoint.reference, checkpoint.directory, checkpoint.revision, hub_id, option)
    return dataclasses.replace(checkpoint, hub_id=declared, revision=revision) if declared else checkpoint


def declared_copy(reference: str, directory: Path, revision: str | None, hub_id: str | None,
                  option: str) -> tuple[str | None, str | None]:
    """(Hub repo, revision) of the model named `reference` and read from `directory`, when `option`
    declares it a local copy of the Hub repo `hub_id`; (None, revision) when nothing is declared.

    Without a declared revision, the commit `hf download --local-dir` recorded
    beside the copy's config.json is taken, when there is one. Works on a bare
    directory too (tokenize reads only the teacher's tokenizer)."""
    if hub_id is None:
        return None, revision
    if REPO_ID.fullmatch(hub_id) is None:
        raise CheckpointError(f"{option} {hub_id!r}: not a Hub repo id; give OWNER/NAME, e.g. Qwen/Qwen3-4B-Base")
    if read_from_hub(reference, directory):
        if hub_id == reference:
            return None, revision
        raise CheckpointError(
            f"{option} {hub_id}: the model was read from the Hub repo {reference} itself; "
            f"{option} names the repo a local copy came from, so drop it"
        )
    return hub_id, revision or _downloaded_revision(directory)


def read_from_hub(reference: str, directory: Path) -> bool:
    """Whether `reference` was a Hub repo id resolved through the cache (to `directory`), not a local path."""
    return Path(reference).expanduser() != directory


def pinned_revision(reference: str, directory: Path, revision: str | None) -> str | None:
    """The revision that names these very bytes: for a Hub model, the commit that was read (the name of
    its snapshot folder in the cache), which stays after the repository moves on; else `revision`."""
    if read_from_hub(reference, directory) and COMMIT.fullmatch(directory.name):
        return directory.name
    return revision


def resolve_declared(reference: str, revision: str | None, hub_id: str | None,
                     option: str) -> tuple[Path, str | None, str | None]:
    """(directory, declared Hub repo, revision) of the model `option` names by path or Hub id, where
    `option`-id may declare the Hub repo a local copy came from (see declared_copy); errors name `option`.

    For commands that read a model's directory whole (distill, tokenize), not its headers."""
    try:
        directory = resolve_directory(reference, revision)
    except CheckpointError as exc:
        raise CheckpointError(f"{option} {exc}") from None
    return (directory, *declared_copy(reference, directory, revision, hub_id, f"{option}-id"))


def _downloaded_revision(directory: Path) -> str | None:
    """The commit `hf download --local-dir` noted for config.json (first line of its .metadata file)."""
    note = directory / ".cache" / "huggingface" / "download" / f"{CONFIG_FILE}.metadata"
    try:
        with note.open(encoding="utf-8") as lines:
            commit = lines.readline(64).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if COMMIT.fullmatch(commit) else None


def open_checkpoint(reference: str | Path, revision: str | None = None, allow_pickle: bool = False) -> Checkpoint:
    """Open a local directory, or resolve a hub repo id through huggingface_hub.

    PyTorch pickle weights are refused unless `allow_pickle` is set.
    """
    directory = resolve_directory(str(reference), revision, allow_pickle)
    try:
        return _open_directory(str(reference), directory, revision, allow_pickle)
    except CheckpointError as exc:
        if directory == Path(reference).expanduser():
            raise
        # A file missing from a cached snapshot: name the repo, not just the cache path.
        at = f"@{revision}" if revision else ""
        raise CheckpointError(f"hub repo {reference}{at}: {exc}") from None


def _open_directory(reference: str, directory: Path, revision: str | None, allow_pickle: bool) -> Checkpoint:
    config = read_config(directory)
    files, index_metadata, weight_map = _weight_files(directory, allow_pickle)
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        header = read_header(path)
        for name, info in header.tensors.items():
            if name in tensors:
                raise CheckpointError(
                    f"{directory}: tensor {name!r} appears in both {tensors[name].file.name} "
                    f"and {path.name}"
                )
            tensors[name] = info
    if weight_map is not None:
        _check_index(directory, weight_map, tensors)
    if not tensors:
        raise CheckpointError(f"{directory}: the checkpoint holds no tensors")
    return Checkpoint(reference, directory, config, tensors, tuple(files), revision, index_metadata)


def resolve_directory(reference: str, revision: str | None, allow_pickle: bool = False) -> Path:
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{reference}: not a directory; give the model directory")
    if _looks_like_path(reference):
        raise CheckpointError(f"{reference}: no such directory")
    return _download_from_hub(reference, revision, allow_pickle)


def _looks_like_path(reference: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a path."""
    return REPO_ID.fullmatch(reference) is None or reference.startswith(".")


def _download_from_hub(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    """Resolve a repo id via huggingface_hub (cache, HF_HUB_OFFLINE, token, revision)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"@{revision}" if revision else ""
    try:
        patterns = HUB_PATTERNS + (["*.bin", PICKLE_INDEX] if allow_pickle else [])
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}{at}: revision not found on the hub") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: no such local directory and no such hub repository "
            "(check the id, or log in with `hf auth login` for a gated repo)"
        ) from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id}{at}: not a local directory and not in the Hugging Face cache "
            "(offline mode or no network); download it first or unset HF_HUB_OFFLINE"
        ) from None
    except (HfHubHTTPError, ValueError, OSError) as exc:
        raise CheckpointError(f"{repo_id}{at}: cannot resolve on the hub ({exc})") from None


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json; is this a Hugging Face model directory?")
    try:
        config = json.loads(read_bounded(path, CONFIG_LIMIT, "config.json", CheckpointError))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: not valid JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def _weight_files(directory: Path, allow_pickle: bool) -> tuple[list[Path], dict, dict[str, str] | None]:
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map, metadata = _read_index(index_path)
        names = sorted(set(weight_map.values()))
        return [_member_file(directory, index_path, name) for name in names], metadata, weight_map
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single], {}, None
    pickles = pickle_files(directory)
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{directory}: only PyTorch pickle weights (.bin) found; convert them to safetensors, "
                "or pass --allow-pickle to read them with torch.load(weights_only=True)"
            )
        return convert_to_safetensors(pickles), {}, None
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


def _read_index(index_path: Path) -> tuple[dict[str, str], dict]:
    try:
        index = json.loads(read_bounded(index_path, INDEX_LIMIT, "index", CheckpointError))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(
            f"{index_path}: expected JSON with a 'weight_map' of tensor name to file name"
        ) from None
    metadata = index.get("metadata") or {}
    return weight_map, metadata if isinstance(metadata, dict) else {}


def _member_file(directory: Path, index_path: Path, name: str) -> Path:
    """A shard named by the index: a plain file name inside the directory."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or os.path.isabs(name):
        raise CheckpointError(
            f"{index_path}: shard name {name!r} is not a plain file name in the checkpoint directory"
        )
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{index_path}: names {name!r}, which does not exist")
    return path


def _check_index(directory: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    for name, file_name in weight_map.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(
                f"{directory / INDEX_FILE}: lists tensor {name!r} in {file_name}, which does not hold it"
            )
        if info.file.name != file_name:
            raise CheckpointError(
                f"{directory / INDEX_FILE}: says {name!r} is in {file_name} but it is in {info.file.name}"
            )
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        raise CheckpointError(
            f"{directory / INDEX_FILE}: tensor {extra[0]!r} is in {tensors[extra[0]].file.name} "
            "but missing from the index"
        )
