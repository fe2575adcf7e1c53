"""Output directories that appear whole or not at all, written by one process.

Everything is written into a temporary sibling named after the target and
this process id, fsynced, then renamed onto the target. (Writers ask the
kernel to start writing ranges to disk as soon as they are complete,
checkpoint/kernel.py's `start_writeback`, so that this fsync has little left
to wait for.) Temporaries left by a process that no longer runs (killed
with SIGKILL, power loss) are removed the next time anything is written
beside them.

Exactly one writer wins. A writer holds the target's sibling lock file
(`output_lock`) from before it looks at the target until after the rename,
so a second layersplice run on the same output refuses at once instead of
replacing the first one's work; the rename itself refuses to replace
anything (renameat2 RENAME_NOREPLACE), which also covers other programs.
--force swaps the new output in with RENAME_EXCHANGE, so the path always
holds the old or the new output, never neither.

Outputs never overlap inputs: `refuse_overlap` compares resolved real paths,
so a symlink or `..` cannot make an output replace or grow into a source.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from layersplice.checkpoint.kernel import rename_exchange, rename_noreplace
from layersplice.errors import OutputError

TMP_MARK = ".layersplice-tmp-"
OLD_MARK = ".layersplice-old-"
LOCK_MARK = ".layersplice-lock"
OWNER_FILES = ("layersplice.json", "manifest.json")
Inputs = Iterable[tuple[str, "Path | str"]]  # (what the input is, e.g. "the teacher"; its path)


class OutputBusy(OutputError):
    """Another process holds the output's lock."""


def temp_sibling(target: Path) -> Path:
    return target.parent / f".{target.name}{TMP_MARK}{os.getpid()}"


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_MARK}"


def is_working_file(name: str) -> bool:
    """Whether `name` is one of the hidden files layersplice keeps beside an output while writing it."""
    return name.startswith(".") and any(mark in name for mark in (TMP_MARK, OLD_MARK, LOCK_MARK))


def refuse_overlap(out: Path, inputs: Inputs) -> None:
    """Refuse an output that is, contains or lies inside one of the command's inputs.

    Every command that writes calls this before writing, --force or not:
    replacing or writing into a source would destroy what the command reads
    (the only copy of a student, say). Real paths are compared, so symlinks
    and `..` are seen through.
    """
    real_out = Path(os.path.realpath(out))
    for what, source in inputs:
        real = Path(os.path.realpath(source))
        if real_out == real:
            relation = "is"
        elif real.is_relative_to(real_out):
            relation = "contains"
        elif real_out.is_relative_to(real):
            relation = "lies inside"
        else:
            continue
        raise OutputError(
            f"--out {out} {relation} {what} ({source}); writing there would destroy an input. "
            "Choose an --out outside every input (--force does not change this)"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _target_of(entry: Path) -> Path | None:
    """The output a hidden temporary was written for, if `entry` is one."""
    for mark in (TMP_MARK, OLD_MARK):
        head, sep, pid = entry.name.rpartition(mark)
        if sep and head.startswith(".") and pid.isdigit():
            return entry.parent / head[1:]
    return None


def stale_temporaries(parent: Path) -> list[Path]:
    """Temporaries of layersplice processes that no longer run, in `parent`."""
    if not parent.is_dir():
        return []
    stale = []
    for entry in sorted(parent.iterdir()):
        if _target_of(entry) is not None and not _pid_alive(int(entry.name.rpartition("-")[2])):
            stale.append(entry)
    return stale


def _adoptable(own: list[Path]) -> Path | None:
    """The newest dead temporary written for the target."""
    candidates = [p for p in own if TMP_MARK in p.name and p.is_dir()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


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


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold the lock of `target` (a hidden sibling file): one layersplice writer per output.

    Refuses at once with OutputBusy, naming the holder, when another process
    holds it: waiting could hang behind a stuck run, and the holder's output
    will exist when it ends anyway. The kernel drops the lock of a process
    that dies, so a killed run never blocks the next. The file is removed on
    release; a process that locked a file already removed locks again.
    """
    path = lock_path(target)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write in {target.parent}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusy(
                f"{target} is being written by another layersplice run (pid {holder}) and exists once it "
                "ends; choose another --out, or wait for that run and pass --force to replace its output"
            ) from None
        if _same_file(fd, path):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


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
def atomic_directory(target: Path, force: bool = False, adopt: bool = False, *, inputs: Inputs) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` when the block succeeds.

    `inputs` are everything the command reads (see `refuse_overlap`); every
    writer must name them. The target's lock is held from the first look at
    the target to the rename. With `adopt`, the temporary of a killed earlier
    run for the same target is taken over (so finished parts can be kept)
    instead of being removed. Any OSError while writing becomes a one-line
    OutputError, and the temporary is removed.
    """
    target = Path(target)
    refuse_overlap(target, inputs)
    check_target(target, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {target.parent}: {exc.strerror}") from None
    with output_lock(target):
        check_target(target, force)  # another run may have published it before we held the lock
        tmp = _fresh_temporary(target, adopt)
        try:
            yield tmp
            fsync_tree(tmp)
            _publish(tmp, target, force)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(f"writing {target} failed: {exc}; nothing was left at {target}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _fresh_temporary(target: Path, adopt: bool) -> Path:
    """This process's temporary for `target`, empty or adopted; stale temporaries beside it removed."""
    stale = stale_temporaries(target.parent)
    own = [p for p in stale if _target_of(p) == target]
    previous = _adoptable(own) if adopt else None
    for entry in own:
        if entry != previous:
            shutil.rmtree(entry, ignore_errors=True)
    for entry in stale:
        if _target_of(entry) != target:
            _remove_unowned(entry)
    tmp = temp_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if previous is not None:
            _take_over(previous, tmp)
        else:
            tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write in {target.parent}: {exc.strerror}") from None
    return tmp


def _take_over(previous: Path, tmp: Path) -> None:
    try:
        os.rename(previous, tmp)
    except FileNotFoundError:  # a run writing beside it claimed it first (_remove_unowned)
        tmp.mkdir()


def _remove_unowned(entry: Path) -> None:
    """Remove another target's dead temporary, unless a run of that target adopts it first.

    Renaming it to a name of our own claims it in one step: of this rename and
    an adopting run's rename, exactly one succeeds, so a temporary being
    adopted is never deleted under the run that took it.
    """
    claimed = entry.parent / f".{entry.name}{OLD_MARK}{os.getpid()}"
    try:
        os.rename(entry, claimed)
    except OSError:
        return
    shutil.rmtree(claimed, ignore_errors=True)


def _publish(tmp: Path, target: Path, force: bool) -> None:
    """Rename the finished temporary onto the target; called with the target's lock held."""
    if force and (target.exists() or target.is_symlink()):
        check_target(target, force)  # still an earlier layersplice output
        if rename_exchange(tmp, target):
            old = tmp  # the swap left the old output at the temporary's name
        else:
            # No exchange on this file system: a moment without the target,
            # but no other layersplice run can look, as we hold the lock.
            old = target.parent / f".{target.name}{OLD_MARK}{os.getpid()}"
            os.rename(target, old)
            os.rename(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        if not rename_noreplace(tmp, target):
            if target.exists() or target.is_symlink():
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
            os.rename(tmp, target)
    except FileExistsError:
        raise OutputError(
            f"{target} already exists: another program created it while this run wrote. It was left as it "
            "is and this run's output removed; choose another --out or pass --force to replace it"
        ) from None
    _fsync_dir(target.parent)
