"""The shard writer: casts give torch's bytes, checksums cover the bytes written,
ranges are copied in source order, headers are padded so copies keep their
page offsets, and every kernel call has a fallback."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from blake3 import blake3

from layersplice.checkpoint import kernel, writer
from layersplice.checkpoint.cast import CHUNK_ELEMENTS, IO_ELEMENTS, Cast, NonFinite
from layersplice.checkpoint.digest import blake3_file
from layersplice.checkpoint.safetensors_format import read_header
from layersplice.checkpoint.writer import SourceFiles, write_shards
from layersplice.planning.plan import PlannedTensor

TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
REPO_ROOT = Path(__file__).resolve().parent.parent


def _values() -> np.ndarray:
    """Every magnitude a weight can have, plus the edges of each format."""
    rng = np.random.default_rng(0)
    scales = (1e-42, 1e-8, 2e-2, 1.0, 7e4, 1e38)
    edges = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1 + 2**-8, 1 + 3 * 2**-8, 65504.0, 65520.0,
             2**-24, 2**-25, 1e-45, 3.3895313892515355e38, 3.4e38]
    # Longer than one I/O chunk, with a tail shorter than a conversion chunk.
    count = IO_ELEMENTS + CHUNK_ELEMENTS + 123
    return np.concatenate([edges, *(rng.standard_normal(count // len(scales)) * s for s in scales)])


def _cast_all(cast: Cast, raw: bytes) -> bytes:
    count = len(raw) // cast.in_size
    buffer = bytearray(IO_ELEMENTS * cast.out_size)
    out = bytearray()
    for first in range(0, count, IO_ELEMENTS):
        n = min(IO_ELEMENTS, count - first)
        out += cast.convert(np.frombuffer(raw, np.uint8, n * cast.in_size, first * cast.in_size), buffer)
    return bytes(out)


@pytest.mark.parametrize(("src", "dst"), [(a, b) for a in sorted(TORCH) for b in sorted(TORCH) if a != b])
def test_cast_writes_the_bytes_torch_writes(src, dst):
    """Every value torch casts to a finite one, to the same bytes; the others (NaN, infinity, beyond the
    target's range) are refused (tests/test_non_finite.py)."""
    source = torch.from_numpy(_values()).to(TORCH[src])
    finite = source[torch.isfinite(source.to(TORCH[dst]))]
    expected = finite.to(TORCH[dst]).view(torch.uint8).numpy().tobytes()
    assert _cast_all(Cast(src, dst), finite.view(torch.uint8).numpy().tobytes()) == expected
    with pytest.raises(NonFinite):
        _cast_all(Cast(src, dst), source.view(torch.uint8).numpy().tobytes())


def _safetensors(path: Path, tensors: dict[str, np.ndarray], cast: str = "F32") -> dict[str, PlannedTensor]:
    """Write F32 tensors in the given order; return each as an item written as `cast`."""
    from layersplice.checkpoint.safetensors_format import encode_header

    tensors = {name: array.astype(np.float32) for name, array in tensors.items()}
    header = encode_header([(n, "F32", a.shape, a.nbytes) for n, a in tensors.items()], {"format": "pt"})
    path.write_bytes(header + b"".join(a.tobytes() for a in tensors.values()))
    infos = read_header(path).tensors
    return {name: PlannedTensor(name, infos[name], "teacher", cast) for name in tensors}


@pytest.fixture()
def three_tensors(tmp_path) -> dict[str, PlannedTensor]:
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal((rows, 7)) for name, rows in (("a", 5), ("b", 300), ("c", 11))}
    return _safetensors(tmp_path / "source.safetensors", arrays)


def _write(directory: Path, items) -> list[writer.WrittenFile]:
    directory.mkdir()
    with SourceFiles() as sources:
        return write_shards(directory, items, 1 << 30, sources)


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    data = path.read_bytes()
    return {name: data[t.start : t.end] for name, t in read_header(path).tensors.items()}


def test_tensors_adjacent_in_a_source_are_copied_in_one_kernel_call(tmp_path, three_tensors, monkeypatch):
    calls = []
    real = kernel.COPIERS[0]
    monkeypatch.setattr(kernel, "COPIERS", (lambda *args: calls.append(args) or real(*args), *kernel.COPIERS[1:]))
    items = [three_tensors[n] for n in ("c", "a", "b")]
    [written] = _write(tmp_path / "out", items)
    assert written.tensors == ("a", "b", "c")  # the source's byte order
    assert len(calls) == 1
    out = _tensor_bytes(tmp_path / "out" / written.name)
    assert out == _tensor_bytes(tmp_path / "source.safetensors")


def test_the_recorded_digest_is_blake3_of_the_file_written(tmp_path, three_tensors, monkeypatch):
    monkeypatch.setattr(writer, "COPY_CHUNK", 1000)  # the hashing thread follows many small steps
    [written] = _write(tmp_path / "out", list(three_tensors.values()))
    path = tmp_path / "out" / written.name
    assert written.blake3 == blake3_file(path) == blake3(path.read_bytes()).hexdigest()
    assert written.size == path.stat().st_size


@pytest.mark.parametrize("conversion", ["compiled", "numpy"])
def test_a_cast_of_many_chunks_writes_each_where_it_belongs(tmp_path, monkeypatch, conversion):
    from layersplice.checkpoint import cast

    if conversion == "numpy":
        monkeypatch.setattr(cast, "native", lambda: None)
    elif cast.native() is None:
        pytest.skip("the compiled cast is not built here")
    monkeypatch.setattr(cast, "IO_ELEMENTS", 1000)  # many chunks in flight at once
    rng = np.random.default_rng(1)
    arrays = {"big": rng.standard_normal((97, 131)), "small": rng.standard_normal(3), "odd": rng.standard_normal((3, 1001))}
    items = _safetensors(tmp_path / "source.safetensors", arrays, cast="BF16")
    [written] = _write(tmp_path / "out", list(items.values()))
    out = _tensor_bytes(tmp_path / "out" / written.name)
    for name, array in arrays.items():
        expected = torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
        assert out[name] == expected, name
    assert written.blake3 == blake3_file(tmp_path / "out" / written.name)


def test_the_digest_covers_copied_and_cast_ranges_of_one_shard(tmp_path, monkeypatch):
    from layersplice.checkpoint import cast

    monkeypatch.setattr(cast, "IO_ELEMENTS", 700)  # casts hashed from memory in many pieces
    rng = np.random.default_rng(2)
    arrays = {name: rng.standard_normal(n) for name, n in (("a", 3000), ("b", 10), ("c", 2049), ("d", 5))}
    items = _safetensors(tmp_path / "source.safetensors", arrays)
    mixed = [PlannedTensor(n, t.source, t.model, "BF16" if n in ("b", "c") else "F32") for n, t in items.items()]
    [written] = _write(tmp_path / "out", mixed)
    path = tmp_path / "out" / written.name
    assert written.blake3 == blake3(path.read_bytes()).hexdigest()
    out = _tensor_bytes(path)
    assert out["a"] == _tensor_bytes(tmp_path / "source.safetensors")["a"]
    assert out["c"] == torch.from_numpy(arrays["c"].astype(np.float32)).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def test_the_digest_hands_back_every_buffer_even_after_an_error(tmp_path):
    from layersplice.checkpoint.digest import TrailingDigest

    path = tmp_path / "file"
    path.write_bytes(bytes(range(10)))
    returned: list[int] = []
    digest = TrailingDigest(path)
    digest.written(4, memoryview(b"\0\1\2"), lambda: returned.append(1))  # 3 bytes for a 4-byte range
    digest.written(8, memoryview(b"\4\5\6\7"), lambda: returned.append(2))
    with pytest.raises(ValueError, match="3 bytes handed over for the range 0..4"):
        digest.finish()
    assert returned == [1, 2]


def test_a_failed_cast_write_puts_its_buffers_back_in_the_pool(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    from layersplice.checkpoint import cast

    monkeypatch.setattr(cast, "IO_ELEMENTS", 500)
    items = _safetensors(tmp_path / "source.safetensors", {"big": rng.standard_normal(20_000)}, cast="BF16")
    pool = writer._cast_buffers("BF16", 500)
    size = pool.qsize()
    writes = []

    def failing_pwrite(fd, data, offset):
        writes.append(offset)
        if len(writes) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return kernel.pwrite_all(fd, data, offset)

    monkeypatch.setattr(writer, "pwrite_all", failing_pwrite)
    with pytest.raises(OSError, match="No space left"):
        _write(tmp_path / "out", list(items.values()))
    assert pool.qsize() == size


def _refusing(errno_code: int, calls: list):
    def copier(*args):
        calls.append(errno_code)
        raise OSError(errno_code, os.strerror(errno_code))

    return copier


@pytest.mark.parametrize("refused", range(1, len(kernel.COPIERS)))
def test_a_copier_the_files_do_not_support_falls_back_to_the_next(tmp_path, three_tensors, monkeypatch, refused):
    items = list(three_tensors.values())
    [expected] = _write(tmp_path / "kernel", items)
    calls: list = []
    copiers = [_refusing(errno.EXDEV, calls)] * refused + list(kernel.COPIERS[refused:])
    monkeypatch.setattr(kernel, "COPIERS", tuple(copiers))
    [written] = _write(tmp_path / "fallback", items)
    assert calls == [errno.EXDEV] * refused
    assert written == expected
    assert (tmp_path / "fallback" / written.name).read_bytes() == (tmp_path / "kernel" / expected.name).read_bytes()


def test_a_write_error_is_raised_not_retried_another_way(tmp_path, three_tensors, monkeypatch):
    calls: list = []
    monkeypatch.setattr(kernel, "COPIERS", (_refusing(errno.ENOSPC, calls), *kernel.COPIERS))
    with pytest.raises(OSError) as raised:
        _write(tmp_path / "out", list(three_tensors.values()))
    assert raised.value.errno == errno.ENOSPC and calls == [errno.ENOSPC]


def test_build_all_checksums_are_blake3_and_sources_are_opened_once(tmp_path, checkpoints, monkeypatch):
    from click.testing import CliRunner
    from conftest import ALIGNMENTS

    from layersplice.cli.main import cli

    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    source_dirs = (str(pair.teacher_dir), str(pair.student_dir))
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, *args, **kwargs):
        # Weight files: the copies of every size and the content digest of the part record share one descriptor.
        if str(path).startswith(source_dirs) and str(path).endswith(".safetensors"):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    out = tmp_path / "sizes"
    args = ["build", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir), "--all", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert opened and len(opened) == len(set(opened)), sorted(opened)

    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["sizes"]) > 2
    for size in manifest["sizes"]:
        directory = out / size["directory"]
        provenance = json.loads((directory / "layersplice.json").read_text())
        for records in (provenance["files"], size["files"]):
            for name, record in records.items():
                assert set(record) == {"size", "blake3"}
                assert record == {"size": (directory / name).stat().st_size, "blake3": blake3_file(directory / name)}


def test_build_without_a_cast_imports_neither_torch_nor_numpy(tmp_path, checkpoints):
    from conftest import ALIGNMENTS

    pair = checkpoints("llama", ALIGNMENTS["1-2-2"])
    script = (
        "import sys\n"
        "from layersplice.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))\n"
    )
    args = ["build", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir), "--keep", "1",
            "--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _with_header_padding(path: Path, tensors: dict[str, np.ndarray], pad: int) -> dict[str, PlannedTensor]:
    """F32 tensors in a file whose header has `pad` extra spaces (so its data starts at another page offset)."""
    from layersplice.checkpoint.safetensors_format import encode_header

    header = encode_header([(n, "F32", a.shape, a.nbytes) for n, a in tensors.items()], {"format": "pt"})
    raw = header[8:] + b" " * pad
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(a.tobytes() for a in tensors.values()))
    infos = read_header(path).tensors
    return {name: PlannedTensor(name, infos[name], "teacher", "F32") for name in tensors}


def test_the_header_is_padded_so_most_copied_bytes_keep_their_page_offset(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(2)
    big = {f"big.{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(3)}  # 48 KiB
    small = {"small.0": rng.standard_normal((16, 16)).astype(np.float32)}  # 1 KiB
    items = [*_with_header_padding(tmp_path / "a.safetensors", big, 1000).values(),
             *_with_header_padding(tmp_path / "b.safetensors", small, 8).values()]
    [written] = _write(tmp_path / "out", items)
    out = tmp_path / "out" / written.name
    placed = read_header(out).tensors
    for item in items:
        shift = (placed[item.name].start - item.source.start) % 4096
        # The larger source decides the padding; the smaller one cannot match both.
        assert (shift == 0) == item.name.startswith("big"), item.name
    header_length = int.from_bytes(out.read_bytes()[:8], "little")
    assert header_length % 8 == 0
    loaded = load_file(out)  # the safetensors library reads the padded header
    for name, array in {**big, **small}.items():
        assert np.array_equal(loaded[name], array)


def test_outputs_stay_byte_identical_for_the_same_inputs(tmp_path, three_tensors):
    items = list(three_tensors.values())
    [first] = _write(tmp_path / "one", items)
    [second] = _write(tmp_path / "two", items)
    assert (tmp_path / "one" / first.name).read_bytes() == (tmp_path / "two" / second.name).read_bytes()


def test_a_failed_splice_leaves_no_stale_bytes_for_the_next_copy(tmp_path):
    source = tmp_path / "source"
    source.write_bytes(bytes(range(256)) * 64)
    src = os.open(source, os.O_RDONLY)
    read_only = os.open(source, os.O_RDONLY)
    target = tmp_path / "target"
    dst = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError):  # the pipe is filled, then cannot be drained into a read-only file
            kernel.splice_copy(src, read_only, 4096, 100, 0)
        assert kernel.splice_copy(src, dst, 5000, 7, 0) == 5000
    finally:
        for fd in (src, read_only, dst):
            os.close(fd)
    assert target.read_bytes() == source.read_bytes()[7:5007]


def test_space_is_reserved_before_the_first_byte_and_skipped_where_unsupported(tmp_path, three_tensors, monkeypatch):
    sizes = []
    real = writer.preallocate

    def recording(fd, size):
        real(fd, size)
        sizes.append((size, os.fstat(fd).st_size))

    monkeypatch.setattr(writer, "preallocate", recording)
    [written] = _write(tmp_path / "reserved", list(three_tensors.values()))
    assert sizes == [(written.size, written.size)]

    def unsupported(*args):
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(writer, "preallocate", real)
    monkeypatch.setattr(kernel, "_libc_function", lambda *args: unsupported)
    [again] = _write(tmp_path / "unreserved", list(three_tensors.values()))
    assert again == written
