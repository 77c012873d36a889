"""Crash-safe file replacement, shared by the teacher cache and the training checkpoints.

A file is written to a temporary name in its destination folder, flushed and
fsynced, then ``os.replace``d over the destination, and the folder entry is
fsynced: after a crash at any moment the destination holds either its old
content or all of the new one, never a torn file.
"""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable, Optional


def fsync_directory(directory: str) -> None:
    """Make a rename inside ``directory`` durable (POSIX; Windows cannot open folders and needs no fsync)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path, write: Callable[[BinaryIO], None], temp_path: Optional[str] = None) -> None:
    """``write(f)`` the new content of ``path`` through a temporary file, then rename it over ``path``.

    ``temp_path`` defaults to a unique name next to ``path``; the temporary
    file is removed if ``write`` fails.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if temp_path is None:
        fd, temp_path = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        f = os.fdopen(fd, "wb")
    else:
        f = open(temp_path, "wb")
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
        raise
    fsync_directory(directory)
