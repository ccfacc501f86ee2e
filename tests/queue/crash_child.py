"""Child process for the crash-point tests: commits messages and kills itself at a chosen point.

    python -m tests.queue.crash_child SPOOL POINT K COUNT MODE

POINT is where the k-th commit dies with SIGKILL:
  mid_write     half the bytes are in tmp/, nothing fsynced
  before_rename written and fsynced in tmp/, not yet renamed into msg/
  before_filesync renamed into msg/ before the file's own fsync
  before_dirsync renamed into msg/, the folder not yet fsynced (never acknowledged)
  after_ack     put() returned and the ACK line was printed
MODE is "put" (one at a time), "accept" (10 concurrent accepts), "journal" (the same
through the journal: mid_write cuts the k-th record short, before_filesync dies at the k-th
fsync of a segment) or "state" (one message whose state file is rewritten COUNT times; the
k-th rewrite dies).
Each acknowledged message is printed as "ACK <id> <index>" and flushed before going on.
"""
from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys

import server.queue as queue


def body(i: int) -> bytes:
    return f"Subject: message {i}\r\nMessage-ID: <{i}@crash.test>\r\n\r\n".encode() + bytes([65 + i % 26]) * (1000 + 97 * i)


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    root, point, k, count, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    calls = {"n": 0}

    def nth() -> bool:
        calls["n"] += 1
        return calls["n"] == k

    def folder_of(fd: int) -> str | None:
        """The name of the folder `fd` is open on, or None for a file."""
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            return None
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def folder_named(path, dir_fd) -> str:
        """The folder a path (relative to `dir_fd` when given) is in."""
        return folder_of(dir_fd) if dir_fd is not None else os.path.basename(os.path.dirname(str(path)))

    if point == "mid_write" and mode == "journal":
        import server.journal as journal
        real_write = journal.write_all

        def append(fd, chunks):
            chunks = tuple(chunks)
            if len(chunks) == 2 and nth():   # a message's record (a done mark is one chunk)
                data = b"".join(chunks)
                os.write(fd, data[: len(data) // 2])
                die()
            return real_write(fd, chunks)
        journal.write_all = append
    elif point == "mid_write":
        real_create = queue._create_file

        def create(path, chunks, dir_fd=None):
            is_state = str(path).endswith(".state")
            if folder_named(path, dir_fd) == "tmp" and is_state == (mode == "state") and nth():
                data = b"".join(chunks)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
                os.write(fd, data[: len(data) // 2])
                die()
            return real_create(path, chunks, dir_fd)
        queue._create_file = create
    elif point == "before_rename":
        real_replace = os.replace

        def replace(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            folder = "state" if mode == "state" else "msg"
            if folder_named(dst, dst_dir_fd) == folder and nth():
                die()
            return real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        queue.os.replace = replace  # type: ignore[attr-defined]
    elif point in ("before_filesync", "before_dirsync"):
        real_fsync = os.fsync
        wanted = None if point == "before_filesync" else ("state" if mode == "state" else "msg")

        def fsync(fd):
            if folder_of(fd) == wanted and nth():
                die()
            return real_fsync(fd)
        queue.os.fsync = fsync  # type: ignore[attr-defined]

    spool = queue.Spool(root, use_journal=mode == "journal")
    spool.open()

    def ack(msg, i: int) -> None:
        print(f"ACK {msg.id} {i}", flush=True)
        if point == "after_ack" and i + 1 == k:
            die()

    if mode == "state":
        # one message, then its state rewritten again and again; POINT as for messages
        msg = spool.put("a@crash.test", ["r0@crash.test"], body(0))
        print(f"ACK {msg.id} 0", flush=True)
        calls["n"] = 0
        for i in range(1, count + 1):
            spool.write_state(spool.state(msg.id).update([], attempts=i))
            print(f"STATE {msg.id} {i}", flush=True)
    elif mode == "put":
        for i in range(count):
            ack(spool.put("a@crash.test", [f"r{i}@crash.test"], body(i)), i)
    else:
        async def run() -> None:
            async def one(i: int) -> None:
                msg = await spool.accept("a@crash.test", [f"r{i}@crash.test"], body(i))
                ack(msg, i)
            for start in range(0, count, 10):
                await asyncio.gather(*(one(i) for i in range(start, min(count, start + 10))))
        asyncio.run(run())
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
