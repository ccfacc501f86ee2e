"""Replacing a small file so that a crash leaves either the old or the new one, whole.

Owns the one way the relay rewrites a file in place (the users file, the active-rules
status): a temporary file in the same folder with the final mode, written and fsynced,
renamed over the target, then the folder fsynced so the rename itself survives. The
spool's own files are written by server/queue.py, which has its own naming and recovery.

It never leaves the temporary file behind when something fails, and never chooses a mode.
Also the two low-level steps the spool's files share (server/queue.py, server/journal.py).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional


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


def write_all(fd: int, chunks: Iterable[bytes]) -> None:
    """Write every chunk (one writev for the usual envelope line and message)."""
    pending = [memoryview(c) for c in chunks if c]
    while pending:
        done = os.writev(fd, pending)
        while pending and done >= len(pending[0]):
            done -= len(pending[0])
            pending.pop(0)
        if done:
            pending[0] = pending[0][done:]


def unlink_quietly(path: str | os.PathLike[str], dir_fd: Optional[int] = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
