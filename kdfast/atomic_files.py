"""Crash-safe file replacement, shared by the teacher cache and the training checkpoints.

A file is written to a temporary name in its destination folder, flushed and
fsynced, then ``os.replace``d over the destination, and the folder entry is
fsynced: after a crash at any moment the destination holds either its old
content or all of the new one, never a torn file.
"""

from __future__ import annotations

import os
import stat
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
        # mkstemp's file is private (0600): give it the mode the file had, or the one open() would give.
        os.chmod(temp_path, _mode_for(path))
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


def _mode_for(path: str) -> int:
    """The permission bits ``path`` has, or for a new file those ``open(path, "w")`` would give (0666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask: from /proc on Linux (reading it through os.umask means setting it, which races with
    other threads creating files), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
