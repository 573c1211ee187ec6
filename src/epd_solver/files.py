"""Atomic file writes: every file the library writes goes through :func:`write_atomic`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], *, replace: bool = True,
                 fsync: bool = False) -> bool:
    """Write ``path`` whole or not at all: ``write(tmp)`` fills a temporary file in the same folder, which
    then takes the name. ``replace=True`` replaces an existing file (``os.replace``); ``replace=False`` never
    does (a hard link, or an exclusive create where the file system has no links) and returns False when the
    name exists. ``fsync`` flushes the data to disk before the move."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
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
