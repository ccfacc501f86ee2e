"""The spool's fast paths keep its promises: a small message is written from the event loop
and a large one from a thread, into the same file; the first attempt delivers the bytes that
were accepted (without re-reading the file), later attempts read and check the file, and a
removal error reaches only its own caller."""
from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path

import pytest

import server.queue as queue
from server.queue import CorruptMessage, Spool

from tests.queue.conftest import DATA


def _tamper(spool: Spool, qid: str) -> None:
    path = spool.msg_dir / qid
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x20
    path.write_bytes(bytes(raw))


async def test_small_and_large_messages_are_committed_alike(spool: Spool, monkeypatch) -> None:
    threads: list[str] = []
    real = queue.Spool._write_message

    def spy(self, *args, **kw):
        threads.append(threading.current_thread().name)
        return real(self, *args, **kw)
    monkeypatch.setattr(queue.Spool, "_write_message", spy)
    small = DATA
    large = DATA * (queue.INLINE_WRITE_LIMIT // len(DATA) + 1)
    msgs = [await spool.accept("a@x.test", ["b@y.test"], data) for data in (small, large)]
    assert threads[0] == threading.current_thread().name          # the loop's own thread
    assert threads[1] == "spool-commit"                           # the committing thread
    spool.close()
    again = Spool(spool.root)                                     # what a restart finds
    assert [m.id for m in again.open()] == [m.id for m in msgs]
    assert [again.read_data(m.id) for m in msgs] == [small, large]
    assert [again.get(m.id).size for m in msgs] == [len(small), len(large)]
    again.close()
    spool.open()


async def test_the_first_load_gives_the_accepted_bytes_later_loads_check_the_file(spool: Spool) -> None:
    msg = await spool.accept("a@x.test", ["b@y.test"], DATA)
    assert (spool.msg_dir / msg.id).read_bytes().endswith(DATA)   # durable on disk all the same
    _tamper(spool, msg.id)
    assert await spool.load(msg.id) == DATA      # first attempt: the bytes that were accepted
    # a second attempt (after a deferral) reads the file and finds it altered
    with pytest.raises(CorruptMessage):
        await spool.load(msg.id)
    assert spool.get(msg.id) is None
    assert [p.name.split(".")[0] for p in spool.corrupt_dir.iterdir()] == [msg.id]


async def test_kept_bytes_are_bounded_and_dropped_with_the_message(spool: Spool) -> None:
    spool.fresh_limit = len(DATA) * 2
    msgs = [await spool.accept("a@x.test", [f"b{i}@y.test"], DATA) for i in range(3)]
    assert spool._fresh_bytes == len(DATA) * 2           # the third did not fit
    _tamper(spool, msgs[2].id)
    with pytest.raises(CorruptMessage):                  # so it is read (and checked) from disk
        await spool.load(msgs[2].id)
    await spool.finish(msgs[0].id)                       # finished before any attempt
    assert spool._fresh_bytes == len(DATA) and msgs[0].id not in spool._fresh
    assert await spool.load(msgs[1].id) == DATA
    assert spool._fresh_bytes == 0 and spool._fresh == {}


async def test_finish_without_a_state_file_leaves_state_alone_and_removes_the_message(
        spool: Spool, monkeypatch) -> None:
    msgs = [await spool.accept("a@x.test", [f"b{i}@y.test"], DATA) for i in range(20)]
    st = spool.state(msgs[0].id)
    await spool.record(st.update([], attempts=1))
    unlinked: list[str] = []
    real = queue._unlink_quietly

    def spy(path: Path | str, dir_fd: int | None = None) -> None:
        unlinked.append("msg" if dir_fd == spool._msg_fd else Path(path).parent.name)
        real(path, dir_fd)
    monkeypatch.setattr(queue, "_unlink_quietly", spy)
    await asyncio.gather(*(spool.finish(m.id) for m in msgs))
    assert sorted(unlinked) == ["msg"] * 20 + ["state"]  # one state file was written, one removed
    assert list(spool.msg_dir.iterdir()) == [] and list(spool.state_dir.iterdir()) == []
    assert len(spool) == 0 and spool.total_bytes == 0
    # and a restart finds nothing to deliver
    spool.close()
    again = Spool(spool.root)
    assert again.open() == []
    again.close()
    spool.open()


async def test_a_failed_unlink_fails_only_its_own_finish(spool: Spool, monkeypatch) -> None:
    a = await spool.accept("a@x.test", ["b@y.test"], DATA)
    b = await spool.accept("a@x.test", ["c@y.test"], DATA)
    real = queue._unlink_quietly

    def refuse(path: Path | str, dir_fd: int | None = None) -> None:
        if Path(path).name == a.id:
            raise OSError(errno.EACCES, "Permission denied")
        real(path, dir_fd)
    monkeypatch.setattr(queue, "_unlink_quietly", refuse)
    results = await asyncio.gather(spool.finish(a.id), spool.finish(b.id), return_exceptions=True)
    assert isinstance(results[0], OSError) and results[1] is None
    assert spool.get(a.id) is not None and (spool.msg_dir / a.id).exists()   # still queued
    assert spool.get(b.id) is None and not (spool.msg_dir / b.id).exists()
