"""Group commit: messages that arrive while the committing thread is busy share one fsync of
msg/, and each is still acknowledged only after an fsync of msg/ that came after its rename;
when that fsync fails, every message of the batch is rolled back and refused."""
from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading

import server.queue as queue
from server.group_commit import GroupCommit
from server.queue import Spool

from tests.queue.conftest import DATA
from tests.support.poll import until


def _is_dir(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def _hold_first_file_sync(monkeypatch, events: list[str], fail_dirs: bool = False):
    """os.fsync that notes folder fsyncs in `events`, holds the first file's until the test
    releases it, and optionally fails every folder's."""
    real = os.fsync
    gate = threading.Event()
    held = threading.Event()

    def fsync(fd: int) -> None:
        if _is_dir(fd):
            events.append("dir-start")
            if fail_dirs:
                raise OSError(errno.EIO, "I/O error")
            real(fd)
            events.append("dir-end")
            return
        if not held.is_set():
            held.set()
            assert gate.wait(10), "the test never released the first fsync"
        real(fd)
    monkeypatch.setattr(queue.os, "fsync", fsync)
    return held, gate


async def test_messages_waiting_together_share_one_folder_fsync_and_wait_for_it(
        spool: Spool, monkeypatch) -> None:
    events: list[str] = []
    held, gate = _hold_first_file_sync(monkeypatch, events)
    real_replace = os.replace

    def replace(src, dst, **dir_fds):
        real_replace(src, dst, **dir_fds)
        events.append(f"rename {os.path.basename(dst)}")
    monkeypatch.setattr(queue.os, "replace", replace)

    async def one(i: int) -> str:
        msg = await spool.accept("a@x.test", [f"r{i}@y.test"], DATA)
        events.append(f"ack {msg.id}")
        return msg.id

    first = asyncio.ensure_future(one(0))
    await until(held.is_set, what="the first commit in the thread")
    rest = [asyncio.ensure_future(one(i)) for i in range(1, 20)]
    await until(lambda: sum(e.startswith("rename") for e in events) == 20,
                what="all 20 messages written")
    gate.set()
    ids = await asyncio.gather(first, *rest)

    # one folder fsync for the first message, one for the 19 that waited behind it
    assert [e for e in events if e.startswith("dir")] == ["dir-start", "dir-end"] * 2
    for qid in ids:
        # acknowledged only after a folder fsync that began after its rename had ended
        renamed, acked = events.index(f"rename {qid}"), events.index(f"ack {qid}")
        starts = [j for j in range(renamed, acked) if events[j] == "dir-start"]
        assert starts and "dir-end" in events[starts[0]:acked], qid
    assert sorted(m.id for m in spool.messages()) == sorted(ids)


async def test_a_failed_folder_fsync_refuses_and_rolls_back_its_whole_batch(
        spool: Spool, monkeypatch) -> None:
    held, gate = _hold_first_file_sync(monkeypatch, [], fail_dirs=True)
    tasks = [asyncio.ensure_future(spool.accept("a@x.test", [f"r{i}@y.test"], DATA))
             for i in range(5)]
    await until(held.is_set, what="the first commit in the thread")
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
    assert list(spool.msg_dir.iterdir()) == [] and spool.messages() == []
    monkeypatch.undo()
    msg = await spool.accept("a@x.test", ["b@y.test"], DATA)   # and it works again afterwards
    assert spool.read_data(msg.id) == DATA


async def test_a_removal_and_a_state_write_are_durable_when_they_return(spool: Spool) -> None:
    kept, done = [await spool.accept("a@x.test", [f"r{i}@y.test"], DATA) for i in range(2)]
    await spool.record(spool.state(kept.id).update([], attempts=1))
    await spool.record(spool.state(done.id).update([], attempts=1))
    await spool.finish(done.id)
    spool.close()
    again = Spool(spool.root)                       # what a restart finds
    try:
        assert [m.id for m in again.open()] == [kept.id]
        assert again.state(kept.id).attempts == 1
        assert not (again.state_dir / f"{done.id}.json").exists()
    finally:
        again.close()
        spool.open()


async def test_closing_runs_every_job_already_submitted() -> None:
    group = GroupCommit()
    ran: list[int] = []
    futures = [group.submit(lambda i=i: ran.append(i) or i) for i in range(3)]
    group.close()
    assert ran == [0, 1, 2]
    assert await asyncio.gather(*futures) == [0, 1, 2]
