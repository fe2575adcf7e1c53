"""Reading the small text files layersplice parses whole, with a size cap.

Recipes, family descriptions, config.json and index files are read into
memory and parsed; a wrong path (a weights file, /dev/zero, a named pipe)
must give a one-line error, not exhaust memory or wait forever. The caps are
far above any real file: a recipe or description is a few hundred bytes, a
config.json a few kB, and the index of a ~700 GB, 160k-tensor checkpoint
about 13 MB.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from layersplice.errors import LayerspliceError
from layersplice.units import format_bytes

YAML_LIMIT = 1 << 20  # recipes and family descriptions
CONFIG_LIMIT = 16 << 20  # config.json, student_config.json, a layersplice.json read for its order
INDEX_LIMIT = 64 << 20  # model.safetensors.index.json and its pickle twin


def read_bounded(path: Path, limit: int, what: str, error: type[LayerspliceError]) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes, else `error` naming the problem."""
    try:
        # O_NONBLOCK: opening a named pipe must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: not a regular file; give the path of the {what} itself")
        data = handle.read(limit + 1)
    if len(data) > limit:
        article = "an" if what[0] in "aeiou" else "a"
        raise error(
            f"{path}: {format_bytes(max(info.st_size, len(data)))} is more than the {format_bytes(limit)} "
            f"{article} {what} may hold; is this the right file?"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; is this the right file for a {what}?") from None
