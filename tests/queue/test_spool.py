"""The spool: durable layout, recovery after a crash, state transitions, control requests."""
from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest

from server.queue import (CorruptMessage, MessageState, Spool, SpoolBusy, is_queue_id,
                          lock_holder, new_queue_id, read_entry, scan)

from tests.queue.conftest import DATA


def test_forked_intake_processes_draw_different_queue_ids() -> None:
    # the intake processes are forked from the relay's; ids made in the same microsecond
    # must still differ, so each process's random tail must not repeat its parent's
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, new_queue_id()[-6:].encode())
        os._exit(0)
    os.close(write_end)
    try:
        child_tail = os.read(read_end, 6).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert len(child_tail) == 6 and child_tail != new_queue_id()[-6:]


def test_put_commits_a_file_in_msg_and_nothing_in_tmp(spool: Spool) -> None:
    msg = spool.put("a@x.test", ["b@y.test", "c@y.test"], DATA)
    assert is_queue_id(msg.id)
    assert list(spool.tmp_dir.iterdir()) == []
    path = spool.msg_dir / msg.id
    envelope, _, body = path.read_bytes().partition(b"\n")
    head = json.loads(envelope)
    assert head["version"] == 1
    assert head["sender"] == "a@x.test" and head["recipients"] == ["b@y.test", "c@y.test"]
    assert head["size"] == len(DATA) and body == DATA
    assert spool.read_data(msg.id) == DATA
    # no state file until something happens: every recipient is pending
    assert not (spool.state_dir / f"{msg.id}.json").exists()
    assert spool.state(msg.id).pending == ("b@y.test", "c@y.test")


def test_put_refuses_an_unknown_kind_and_no_recipients(spool: Spool) -> None:
    with pytest.raises(ValueError):
        spool.put("a@x.test", ["b@y.test"], DATA, kind="spam")
    with pytest.raises(ValueError):
        spool.put("a@x.test", [], DATA)
    assert list(spool.msg_dir.iterdir()) == [] and list(spool.tmp_dir.iterdir()) == []


def test_one_relay_per_spool(spool: Spool) -> None:
    other = Spool(spool.root)
    with pytest.raises(SpoolBusy) as err:
        other.open()
    assert str(os.getpid()) in str(err.value)
    assert lock_holder(spool.root) == os.getpid()
    spool.close()
    assert lock_holder(spool.root) is None
    other.open()
    other.close()


async def test_accept_many_at_once(spool: Spool) -> None:
    msgs = await asyncio.gather(*(spool.accept("a@x.test", [f"r{i}@y.test"], DATA + bytes([65 + i % 26]))
                                  for i in range(50)))
    assert len({m.id for m in msgs}) == 50
    assert {p.name for p in spool.msg_dir.iterdir()} == {m.id for m in msgs}
    assert {m.id for m in spool.messages()} == {m.id for m in msgs}
    for i, m in enumerate(msgs):
        assert spool.read_data(m.id) == DATA + bytes([65 + i % 26])
    assert len(spool) == 50 and spool.total_bytes == sum(m.size for m in msgs)
    await spool.finish(msgs[0].id)
    assert len(spool) == 49 and spool.total_bytes == sum(m.size for m in msgs[1:])


async def test_accept_survives_the_caller_being_cancelled(spool: Spool) -> None:
    task = asyncio.create_task(spool.accept("a@x.test", ["b@y.test"], DATA))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the commit still completes and the message is registered: nothing half-done
    deadline = asyncio.get_running_loop().time() + 5
    while not spool.messages():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    assert spool.read_data(spool.messages()[0].id) == DATA


async def test_state_transitions_are_durable_and_final_removes(spool: Spool) -> None:
    msg = await spool.accept("a@x.test", ["b@y.test", "c@y.test"], DATA)
    st = spool.state(msg.id)
    st = st.update([st.recipient("b@y.test").with_reply("isp", "451 4.3.0 later", "4.3.0", "isp.test")],
                   attempts=1, next_attempt=msg.arrival + 300)
    await spool.record(st)
    on_disk = json.loads((spool.state_dir / f"{msg.id}.json").read_text())
    assert on_disk["version"] == 1 and on_disk["attempts"] == 1
    assert on_disk["recipients"][0]["replies"] == {"isp": "451 4.3.0 later"}
    # pending -> delivered, pending -> failed
    import dataclasses
    st = st.update([dataclasses.replace(st.recipient("b@y.test"), status="delivered"),
                    dataclasses.replace(st.recipient("c@y.test"), status="failed")])
    await spool.record(st)
    assert st.done
    assert read_entry(spool.root, msg.id).state.recipient("c@y.test").status == "failed"
    await spool.finish(msg.id)
    assert not (spool.msg_dir / msg.id).exists()
    assert not (spool.state_dir / f"{msg.id}.json").exists()
    assert spool.get(msg.id) is None


def test_recovery_drops_temp_quarantines_torn_and_keeps_the_rest(tmp_path: Path, caplog) -> None:
    root = tmp_path / "spool"
    s = Spool(root)
    s.open()
    good = s.put("a@x.test", ["b@y.test"], DATA)
    torn = s.put("a@x.test", ["b@y.test"], DATA)
    bad_state = s.put("a@x.test", ["b@y.test", "c@y.test"], DATA)
    no_state = s.put("a@x.test", ["d@y.test"], DATA)
    s.write_state(s.state(good.id).update([], attempts=3, next_attempt=123.0))
    s.write_state(s.state(bad_state.id).update([], attempts=1))
    done = s.put("a@x.test", ["e@y.test"], DATA)
    import dataclasses
    st = s.state(done.id)
    s.write_state(st.update([dataclasses.replace(st.recipient("e@y.test"), status="delivered")]))
    s.close()
    # what a crash can leave: a temp file, a torn message, a torn state, an orphan state
    (root / "tmp" / "0000000000000000ABCD").write_bytes(b"half a mess")
    path = root / "msg" / torn.id
    path.write_bytes(path.read_bytes()[:-5])
    (root / "state" / f"{bad_state.id}.json").write_text('{"version": 1, "id": ')
    (root / "state" / "00000000000000000000.json").write_text("{}")

    s2 = Spool(root)
    caplog.set_level("INFO", logger="routedsl.queue")
    waiting = {m.id for m in s2.open()}
    try:
        assert waiting == {good.id, bad_state.id, no_state.id}
        assert list((root / "tmp").iterdir()) == []
        corrupt = sorted(p.name.split(".")[0] for p in (root / "corrupt").iterdir())
        assert corrupt == sorted([torn.id, f"{bad_state.id}"])
        assert s2.state(good.id).attempts == 3 and s2.state(good.id).next_attempt == 123.0
        # a message without (readable) state comes back with every recipient pending
        assert s2.state(bad_state.id).pending == ("b@y.test", "c@y.test")
        assert s2.state(no_state.id).pending == ("d@y.test",)
        # a message whose recipients were all final was removed, not redelivered
        assert not (root / "msg" / done.id).exists()
        assert not (root / "state" / "00000000000000000000.json").exists()
        text = caplog.text
        assert "dropped unfinished temp file" in text and "quarantined" in text
    finally:
        s2.close()


def test_checksum_mismatch_is_quarantined_not_delivered(spool: Spool) -> None:
    msg = spool.put("a@x.test", ["b@y.test"], DATA)
    path = spool.msg_dir / msg.id
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x20
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptMessage):
        spool.read_data(msg.id)
    assert spool.get(msg.id) is None
    assert [p.name.split(".")[0] for p in spool.corrupt_dir.iterdir()] == [msg.id]


def test_scan_reads_without_the_lock(spool: Spool) -> None:
    a = spool.put("a@x.test", ["b@y.test"], DATA)
    b = spool.put("", ["c@y.test"], DATA, kind="bounce")
    entries = scan(spool.root)
    assert [e.message.id for e in entries] == [a.id, b.id]
    assert entries[1].message.kind == "bounce" and entries[1].message.sender == ""
    assert isinstance(entries[0].state, MessageState)


def test_control_requests_round_trip(spool: Spool) -> None:
    from server.queue import submit_request
    import threading
    answers = []

    def relay_side() -> None:
        import time
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            reqs = spool.requests()
            if reqs:
                for r in reqs:
                    answers.append(r)
                    spool.answer(r, True, f"did {r.op}")
                return
            time.sleep(0.02)

    t = threading.Thread(target=relay_side)
    t.start()
    result = submit_request(spool.root, "retry", None, timeout=5)
    t.join()
    assert result == (True, "did retry")
    assert answers[0].op == "retry" and answers[0].id is None
    assert list(spool.control_dir.iterdir()) == []


from hypothesis import given, settings, strategies as st  # noqa: E402

from server.queue import RecipientState  # noqa: E402

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
_address = st.builds(lambda a, b: f"{a}@{b}", st.text("abcxyz.-_+é", min_size=1, max_size=12),
                     st.text("abc.-", min_size=1, max_size=12))


@settings(max_examples=80, deadline=None)
@given(recipients=st.lists(st.builds(RecipientState, _address, st.sampled_from(["pending", "delivered", "failed"]),
                                     st.lists(st.tuples(_text, _text), max_size=3, unique_by=lambda t: t[0]).map(tuple),
                                     st.none() | st.just("4.4.1"), st.none() | _text),
                           min_size=1, max_size=5, unique_by=lambda r: r.address),
       attempts=st.integers(0, 10_000), next_attempt=st.floats(0, 4e9), notified=st.booleans())
def test_state_json_round_trips(recipients, attempts, next_attempt, notified) -> None:
    state = MessageState(id="0000018C2F3A4B5C6D7E", recipients=tuple(recipients), first_arrival=1.5e9,
                         attempts=attempts, next_attempt=next_attempt, delay_notified=notified)
    text = json.dumps(state.to_json(), ensure_ascii=True)
    assert MessageState.from_json(json.loads(text)) == state


def test_bad_control_requests_are_answered_or_quarantined(spool: Spool) -> None:
    (spool.control_dir / "good-name.req").write_text('{"op": "delete"}')     # delete needs an id
    (spool.control_dir / "worse.req").write_text('{"op": "retry", "id": "../../etc"}')
    (spool.control_dir / "bad name!.req").write_text('{"op": "retry"}')
    assert spool.requests() == []
    for name in ("good-name", "worse"):
        answer = json.loads((spool.control_dir / f"{name}.res").read_text())
        assert answer["ok"] is False and "bad request" in answer["message"]
    assert sorted(p.name for p in spool.control_dir.iterdir()) == ["good-name.res", "worse.res"]
    assert [p.name.split(".req")[0] for p in spool.corrupt_dir.iterdir()] == ["bad name!"]


async def test_a_full_disk_fails_the_commit_and_leaves_nothing(spool: Spool, monkeypatch) -> None:
    import errno
    import server.queue as queue

    def full(path, chunks, dir_fd=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(queue, "_create_file", full)
    with pytest.raises(OSError) as err:
        await spool.accept("a@x.test", ["b@y.test"], DATA)
    assert err.value.errno == errno.ENOSPC   # the intake answers 452 4.3.1 from this
    monkeypatch.undo()
    assert list(spool.msg_dir.iterdir()) == [] and spool.messages() == []

    # the folder fsync failing after the rename: rolled back, never acknowledged, never live
    real_fsync = os.fsync

    def broken_sync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "I/O error")
        return real_fsync(fd)
    monkeypatch.setattr(queue.os, "fsync", broken_sync)
    with pytest.raises(OSError):
        await spool.accept("a@x.test", ["b@y.test"], DATA)
    with pytest.raises(OSError):
        spool.put("a@x.test", ["b@y.test"], DATA)
    monkeypatch.undo()
    assert list(spool.msg_dir.iterdir()) == [] and spool.messages() == []
    msg = await spool.accept("a@x.test", ["b@y.test"], DATA)   # and it works again afterwards
    assert spool.read_data(msg.id) == DATA


def test_write_file_removes_its_temp_file_on_error(tmp_path: Path) -> None:
    import server.queue as queue

    def chunks():
        yield b"some"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        queue._write_file(tmp_path / "t", chunks())
    assert list(tmp_path.iterdir()) == []
