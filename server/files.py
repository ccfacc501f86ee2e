"""Replacing a small file so that a crash leaves either the old or the new one, whole.

Owns the one way the relay rewrites a file in place (the users file, the active-rules
status): a temporary file in the same folder with the final mode, written and fsynced,
renamed over the target, then the folder fsynced so the rename itself survives. The
spool's own files are written by server/queue.py, which has its own naming and recovery.

It never leaves the temporary file behind when something fails, and never chooses a mode.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_file(path: str | os.PathLike[str], data: bytes, *, mode: int) -> None:
    """Atomically replace `path` with `data` (permissions `mode`); raises OSError."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
