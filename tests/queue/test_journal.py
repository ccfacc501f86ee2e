"""The journal keeps the spool's promises: a message appended to it is acknowledged only
after the segment's fsync, leaves it only through a durable done mark (or a copy in msg/
before its first state write), survives a restart as an ordinary msg/ file, and is visible
to `routedsl queue` while it is there. Emptied segments are deleted, oldest first."""
from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path
from typing import Iterator

import pytest

import server.journal as journal
import server.queue as queue
from server.queue import CorruptMessage, Spool, read_entry, read_headers, scan

from tests.queue.conftest import DATA

HEADERS = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: hi\r\n"


def _segments(spool: Spool) -> list[str]:
    return journal.segment_names(spool.journal_dir)


@contextlib.contextmanager
def _reopened(spool: Spool) -> Iterator[Spool]:
    """What a restart finds: the relay's spool closed (as after a crash: nothing flushed
    but what was already written) and opened again."""
    spool.close()
    again = Spool(spool.root)
    again.open()
    try:
        yield again
    finally:
        again.close()


@pytest.fixture
def jspool(tmp_path: Path):
    s = Spool(tmp_path / "spool", use_journal=True)
    s.open()
    yield s
    s.close()


async def test_a_message_is_appended_to_the_journal_not_given_a_file(jspool: Spool) -> None:
    msg = await jspool.accept("a@x.test", ["b@y.test"], DATA)
    assert list(jspool.msg_dir.iterdir()) == []
    [name] = _segments(jspool)
    assert (jspool.journal_dir / name).read_bytes().endswith(DATA)
    assert await jspool.load(msg.id) == DATA


async def test_a_finished_message_stays_finished_after_a_restart(jspool: Spool) -> None:
    done = await jspool.accept("a@x.test", ["b@y.test"], DATA)
    waiting = await jspool.accept("a@x.test", ["c@y.test"], DATA + b"second\r\n")
    await jspool.finish(done.id)
    assert jspool.get(done.id) is None
    with _reopened(jspool) as again:
        assert [m.id for m in again.messages()] == [waiting.id]      # the done mark holds
        assert again.read_data(waiting.id) == DATA + b"second\r\n"  # now an ordinary file
        assert again.get(waiting.id).recipients == ("c@y.test",)
        assert again.get(waiting.id).arrival == waiting.arrival
        assert _segments(again) == []                               # the journal emptied


async def test_a_message_gets_its_file_before_its_first_state_write(jspool: Spool) -> None:
    msg = await jspool.accept("a@x.test", ["b@y.test", "c@y.test"], DATA)
    state = jspool.state(msg.id)
    await jspool.record(state.update([queue.RecipientState("b@y.test", "delivered")], attempts=1))
    assert (jspool.msg_dir / msg.id).read_bytes().endswith(DATA)
    assert (jspool.state_dir / f"{msg.id}.json").exists()
    assert await jspool.load(msg.id) == DATA                        # read back from msg/
    with _reopened(jspool) as again:
        assert [m.id for m in again.messages()] == [msg.id]         # once, not twice
        assert again.state(msg.id).pending == ("c@y.test",)
        await again.finish(msg.id)
        assert list(again.msg_dir.iterdir()) == []


async def test_a_record_cut_short_ends_its_segment_and_is_kept_for_inspection(jspool: Spool) -> None:
    msgs = [await jspool.accept("a@x.test", [f"r{i}@y.test"], DATA) for i in range(3)]
    [name] = _segments(jspool)
    line = queue.envelope_line(jspool.get(msgs[0].id), "0" * 64).replace(msgs[0].id.encode(), b"0" * 20)
    with open(jspool.journal_dir / name, "ab") as f:   # a crash in the middle of an append
        f.write(line + DATA[:10])
    with _reopened(jspool) as again:
        assert [m.id for m in again.messages()] == [m.id for m in msgs]
        assert [p.name.split(".")[0] for p in again.corrupt_dir.iterdir()] == [name]
        assert _segments(again) == []


async def test_emptied_segments_are_deleted_oldest_first(jspool: Spool, monkeypatch) -> None:
    monkeypatch.setattr(journal, "SEGMENT_LIMIT", 100)   # no relief: the order alone
    assert jspool._journal is not None
    jspool._journal.segment_bytes = 3 * len(DATA)       # a new segment every few messages
    msgs = [await jspool.accept("a@x.test", [f"r{i}@y.test"], DATA) for i in range(9)]
    assert len(_segments(jspool)) >= 3
    first = _segments(jspool)[0]
    for msg in msgs[1:]:          # the oldest message waits: no segment may go before its own
        await jspool.finish(msg.id)
    await _settled(jspool)
    assert _segments(jspool)[0] == first
    await jspool.finish(msgs[0].id)
    await _settled(jspool)
    assert len(_segments(jspool)) == 1                 # only the one being appended to
    assert len(jspool) == 0
    with _reopened(jspool) as again:
        assert again.messages() == []


async def test_a_slow_first_attempt_does_not_hold_the_journal(jspool: Spool, monkeypatch) -> None:
    monkeypatch.setattr(journal, "SEGMENT_LIMIT", 3)
    assert jspool._journal is not None
    jspool._journal.segment_bytes = 1                  # a new segment for every record
    slow = await jspool.accept("a@x.test", ["slow@y.test"], DATA)
    assert await jspool.load(slow.id) == DATA          # its attempt has begun, and goes on
    for i in range(6):
        msg = await jspool.accept("a@x.test", [f"r{i}@y.test"], DATA)
        await jspool.finish(msg.id)
    deadline = asyncio.get_running_loop().time() + 10
    while len(_segments(jspool)) > 3 or jspool._relief is not None:
        assert asyncio.get_running_loop().time() < deadline, _segments(jspool)
        await _settled(jspool)
    assert (jspool.msg_dir / slow.id).read_bytes().endswith(DATA)   # moved, not lost
    assert slow.id not in jspool._journal
    await jspool.finish(slow.id)                       # the attempt ends: the file goes
    assert list(jspool.msg_dir.iterdir()) == []
    with _reopened(jspool) as again:
        assert again.messages() == []


async def test_an_attempt_waits_for_the_relief_moving_its_message(jspool: Spool, monkeypatch) -> None:
    monkeypatch.setattr(journal, "SEGMENT_LIMIT", 1)
    assert jspool._journal is not None
    jspool._journal.segment_bytes = 1
    first = await jspool.accept("a@x.test", ["b@y.test"], DATA)
    await jspool.accept("a@x.test", ["c@y.test"], DATA)   # past the limit: the relief starts
    assert first.id in jspool._moving                 # copying the oldest message right now
    await jspool.finish(first.id)                     # waits for the copy, then removes the file
    assert jspool.get(first.id) is None
    await _settled(jspool)
    assert not (jspool.msg_dir / first.id).exists()
    with _reopened(jspool) as again:
        assert [m.recipients for m in again.messages()] == [("c@y.test",)]


async def _settled(spool: Spool) -> None:
    """Wait until the committing thread has run every job submitted so far (FIFO)."""
    await spool._committer().submit(lambda: None)


async def test_the_queue_tools_see_messages_in_the_journal(jspool: Spool) -> None:
    msg = await jspool.accept("a@x.test", ["b@y.test"], DATA)
    moved = await jspool.accept("a@x.test", ["c@y.test"], DATA)
    await jspool.record(jspool.state(moved.id).update([], attempts=1))
    assert sorted(e.message.id for e in scan(jspool.root)) == sorted([msg.id, moved.id])
    entry = read_entry(jspool.root, msg.id)
    assert entry is not None and entry.message.recipients == ("b@y.test",)
    assert entry.state.pending == ("b@y.test",)
    assert read_headers(jspool.root, msg.id) == HEADERS
    await jspool.finish(msg.id)
    assert [e.message.id for e in scan(jspool.root)] == [moved.id]
    assert read_entry(jspool.root, msg.id) is None


async def test_a_later_load_reads_the_journal_and_checks_it(jspool: Spool) -> None:
    jspool.fresh_limit = 0                             # nothing kept in memory
    good = await jspool.accept("a@x.test", ["b@y.test"], DATA)
    bad = await jspool.accept("a@x.test", ["c@y.test"], DATA + b"x\r\n")
    assert await jspool.load(good.id) == DATA
    [name] = _segments(jspool)
    path = jspool.journal_dir / name
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x20                                    # the last message's data, altered
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptMessage):
        await jspool.load(bad.id)
    assert jspool.get(bad.id) is None
    assert [p.name.split(".")[0] for p in jspool.corrupt_dir.iterdir()] == [bad.id]
    assert await jspool.load(good.id) == DATA


async def test_a_failed_journal_fsync_refuses_the_message_and_forgets_it(jspool: Spool, monkeypatch) -> None:
    kept = await jspool.accept("a@x.test", ["b@y.test"], DATA)
    real = os.fsync

    def failing(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        real(fd)
    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        await jspool.accept("a@x.test", ["c@y.test"], DATA)
    monkeypatch.setattr(os, "fsync", real)
    assert [m.id for m in jspool.messages()] == [kept.id]
    with _reopened(jspool) as again:                   # its done mark keeps it from coming back
        assert [m.id for m in again.messages()] == [kept.id]


async def test_a_full_disk_leaves_no_partial_record(jspool: Spool, monkeypatch) -> None:
    first = await jspool.accept("a@x.test", ["b@y.test"], DATA)
    real = journal.write_all

    def half_then_full(fd: int, chunks) -> None:
        data = b"".join(chunks)
        os.write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(journal, "write_all", half_then_full)
    with pytest.raises(OSError) as err:
        await jspool.accept("a@x.test", ["c@y.test"], DATA)
    assert err.value.errno == 28
    monkeypatch.setattr(journal, "write_all", real)
    second = await jspool.accept("a@x.test", ["d@y.test"], DATA)
    with _reopened(jspool) as again:
        assert [m.id for m in again.messages()] == [first.id, second.id]
        assert list(again.corrupt_dir.iterdir()) == []   # the segment reads to its end


async def test_a_restart_keeps_the_copy_already_in_msg(jspool: Spool) -> None:
    msg = await jspool.accept("a@x.test", ["b@y.test"], DATA)
    # copied to msg/ but the done mark not yet written: a crash in between
    jspool._write_and_sync(jspool.get(msg.id), DATA)
    with _reopened(jspool) as again:
        assert [m.id for m in again.messages()] == [msg.id]
        assert again.read_data(msg.id) == DATA


async def test_a_copy_cut_short_in_tmp_does_not_stop_the_restart(jspool: Spool) -> None:
    msg = await jspool.accept("a@x.test", ["b@y.test"], DATA)
    # a crash while the message was being copied to msg/: half a file left in tmp/
    (jspool.tmp_dir / msg.id).write_bytes(DATA[:10])
    with _reopened(jspool) as again:
        assert [m.id for m in again.messages()] == [msg.id]
        assert again.read_data(msg.id) == DATA
        assert list(again.tmp_dir.iterdir()) == []
