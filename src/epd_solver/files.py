"""Atomic file writes: every file the library writes goes through :func:`write_atomic`.

A write fills a hidden temporary file ``.<name>.<pid>.<random>.tmp`` next to the target, gives it the
permissions a plain ``open()`` would (0666 less the umask), and renames it into place. The temporary file
is removed on any failure, Ctrl-C included; one left by a killed process (SIGKILL, power loss) is removed
by the next write of the same name once its process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["write_atomic", "current_umask", "STALE_TMP_S", "check_writable", "claim_folder", "FolderBusyError"]

TMP_NAME_CHARS = 100  # the target's name is cut to this in the temporary name, so a long name still fits
STALE_TMP_S = 60.0  # a dead writer's temporary file this old (no longer being written) is removed


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(mask)
    return mask


def _tmp_prefix(path: Path) -> str:
    return f".{path.name[:TMP_NAME_CHARS]}.{os.getpid()}."


def _remove_stale(path: Path) -> None:
    """Remove temporary files of ``path`` left by writers that no longer run (killed mid-write)."""
    stem = f".{path.name[:TMP_NAME_CHARS]}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.startswith(stem) and name.endswith(".tmp")):
            continue
        pid = name[len(stem):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # the writer still runs
        except ProcessLookupError:
            pass
        except OSError:  # another user's live process
            continue
        try:
            if now - entry.stat().st_mtime > STALE_TMP_S:
                os.unlink(entry.path)
        except OSError:
            pass


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], *, replace: bool = True,
                 fsync: bool = False) -> bool:
    """Write ``path`` whole or not at all: ``write(tmp)`` fills a temporary file in the same folder, which
    then takes the name. ``replace=True`` replaces an existing file (``os.replace``); ``replace=False`` never
    does (a hard link, or an exclusive create where the file system has no links) and returns False when the
    name exists. ``fsync`` flushes the data to disk before the move. The file gets mode 0666 less the
    umask; the temporary file never outlives a failed or interrupted write."""
    path = Path(path)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # after write: some writers replace the file (safetensors)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if the name exists
        except FileExistsError:
            return False
        except OSError:  # no hard links here
            try:
                with open(path, "xb") as dst, open(tmp, "rb") as src:
                    shutil.copyfileobj(src, dst)
            except FileExistsError:
                return False
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class FolderBusyError(OSError):
    """Another process is writing into the same output folder."""


LOCK_NAME = ".epd-lock"
SPACE_MARGIN = 1.1  # free space asked for beyond the planned bytes


def check_writable(folder: str | os.PathLike, planned_bytes: int = 0, what: str = "--out") -> None:
    """Before any expensive work: ``folder`` takes a file, and has room for ``planned_bytes`` (with a margin).

    Raises an ``OSError`` whose message names the folder and the fix (another folder, free space)."""
    folder = Path(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".epd-write-check.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OSError(e.errno, f"{what} {folder} is not writable ({e.strerror}); choose another folder") from None
    need = int(planned_bytes * SPACE_MARGIN)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(errno.ENOSPC, f"{what} {folder} has {free / 2**20:.1f} MiB free, the planned files need about "
                                    f"{need / 2**20:.1f} MiB; free some space or choose another folder")


@contextlib.contextmanager
def claim_folder(folder: str | os.PathLike, what: str = "--out") -> Iterator[None]:
    """Hold ``folder`` for this process while it writes there: a second ``epd`` writing into the same folder
    stops at once with :class:`FolderBusyError` instead of racing (an advisory lock on ``folder/.epd-lock``,
    released when the process ends, however it ends). Without ``fcntl`` (Windows) this is a no-op."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    path = Path(folder) / LOCK_NAME
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise FolderBusyError(errno.EBUSY, f"{what} {folder} is being written by another epd process "
                                               f"(pid {holder}); wait for it to finish or choose another folder") from None
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        try:
            os.unlink(path)  # the folder holds only what the user asked for once we are done
        except OSError:
            pass
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
