"""The safetensors file format: an 8-byte little-endian header length, a JSON
header of {name: {dtype, shape, data_offsets}} plus optional __metadata__, then
raw tensor bytes. Reading a header never touches tensor data.

Every header is validated strictly: a file that passes here can be copied byte
range by byte range without ever producing a tensor that lies about its size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from layersplice.errors import CheckpointError

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# A header larger than this is not a model header but a corrupt or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"
# The page size written files are laid out for: fixed, so that the same inputs
# give the same bytes on every machine.
PAGE_BYTES = 4096


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: absolute byte range [start, end) in file."""

    name: str
    file: Path
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate one safetensors file's header."""
    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise CheckpointError(
                    f"{path}: header length {header_len} does not fit in the "
                    f"{file_size}-byte file; the file is truncated or not safetensors"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_header(path, raw, file_size)


def parse_header(path: Path, raw: bytes, file_size: int) -> SafetensorsHeader:
    """Validate a raw JSON header against the size of the file it came from."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    tensors = {
        name: _tensor_info(path, name, entry, data_start, data_size)
        for name, entry in header.items()
    }
    _check_no_overlap(path, tensors)
    return SafetensorsHeader(path, tensors, dict(metadata), data_start, file_size)


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(
            f"{path}: tensor {name!r} must have exactly dtype, shape and data_offsets"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise CheckpointError(
            f"{path}: tensor {name!r} data_offsets {offsets!r} lie outside the "
            f"{data_size}-byte data area"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} holds {offsets[1] - offsets[0]} bytes but "
            f"shape {shape} of {dtype} needs {expected}"
        )
    return TensorInfo(
        name, path, data_start + offsets[0], data_start + offsets[1], dtype, tuple(shape)
    )


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{path}: tensors {name_a!r} and {name_b!r} overlap")


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str], data_phase: int | None = None
) -> bytes:
    """Header bytes (length prefix included) for (name, dtype, shape, nbytes) in data order.

    The JSON is padded with spaces to a multiple of 8 bytes, as safetensors does,
    so tensor data starts aligned; with `data_phase` (a multiple of 8), further
    spaces make the data start at that offset within a PAGE_BYTES page.
    """
    header: dict[str, object] = {METADATA_KEY: metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if data_phase is not None:
        raw += b" " * ((data_phase - 8 - len(raw)) % PAGE_BYTES)
    return struct.pack("<Q", len(raw)) + raw
