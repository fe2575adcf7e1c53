"""Output directories that appear whole or not at all.

Everything is written into a temporary sibling named after the target and
this process id, fsynced, then renamed onto the target. (Writers ask the
kernel to start writing ranges to disk as soon as they are complete,
checkpoint/kernel.py's `start_writeback`, so that this fsync has little left
to wait for.) Temporaries left by a process that no longer runs (killed
with SIGKILL, power loss) are removed the next time anything is written
beside them.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from layersplice.errors import OutputError

TMP_MARK = ".layersplice-tmp-"
OLD_MARK = ".layersplice-old-"
OWNER_FILES = ("layersplice.json", "manifest.json")


def temp_sibling(target: Path) -> Path:
    return target.parent / f".{target.name}{TMP_MARK}{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(parent: Path) -> list[Path]:
    """Temporaries of layersplice processes that no longer run, in `parent`."""
    if not parent.is_dir():
        return []
    stale = []
    for entry in sorted(parent.iterdir()):
        for mark in (TMP_MARK, OLD_MARK):
            head, sep, pid = entry.name.rpartition(mark)
            if sep and head.startswith(".") and pid.isdigit() and not _pid_alive(int(pid)):
                stale.append(entry)
    return stale


def _adoptable(target: Path, stale: list[Path]) -> Path | None:
    """The newest dead temporary written for this very target."""
    prefix = f".{target.name}{TMP_MARK}"
    own = [p for p in stale if p.name.startswith(prefix) and p.is_dir()]
    return max(own, key=lambda p: p.stat().st_mtime) if own else None


def check_target(target: Path, force: bool) -> None:
    """Refuse to replace anything but an earlier layersplice output, and that only with --force."""
    if not target.exists() and not target.is_symlink():
        return
    if not force:
        raise OutputError(f"{target} already exists; choose another --out or pass --force to replace it")
    if not target.is_dir() or target.is_symlink():
        raise OutputError(f"{target} is not a directory; refusing to replace it even with --force")
    if not any((target / name).is_file() for name in OWNER_FILES):
        raise OutputError(
            f"{target} exists and was not written by layersplice (no layersplice.json); "
            "refusing to replace it even with --force"
        )


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: Path, force: bool = False, adopt: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` when the block succeeds.

    With `adopt`, the temporary of a killed earlier run for the same target is
    taken over (so finished parts can be kept) instead of being removed.
    Any OSError while writing becomes a one-line OutputError, and the
    temporary is removed.
    """
    target = Path(target)
    check_target(target, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {target.parent}: {exc.strerror}") from None
    stale = stale_temporaries(target.parent)
    tmp = temp_sibling(target)
    previous = _adoptable(target, stale) if adopt else None
    for entry in stale:
        if entry != previous:
            shutil.rmtree(entry, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if previous is not None:
            os.rename(previous, tmp)
        else:
            tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write in {target.parent}: {exc.strerror}") from None
    try:
        yield tmp
        fsync_tree(tmp)
        _replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"writing {target} failed: {exc}; nothing was left at {target}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.parent / f".{target.name}{OLD_MARK}{os.getpid()}"
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
