"""`routedsl queue` against a spool with no relay and against a running scheduler."""
from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

from server.engines.base import EngineContext
from server.queue import Spool, read_entry
from server.queue_cli import main
from tests.queue.support import MESSAGE, Table, running, smarthost, until
from tests.support.fake_smtp import FakeSmtp

CTX = EngineContext(hostname="relay.test")


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def filled(root: Path) -> list:
    spool = Spool(root)
    spool.open()
    try:
        a = spool.put("alice@home.test", ["bob@ok.test", "carol@ok.test"], MESSAGE)
        st = spool.state(a.id)
        spool.write_state(st.update([st.recipient("bob@ok.test").with_reply("isp", "451 4.3.0 later", "4.3.0", None)],
                                    attempts=2, next_attempt=a.arrival + 600))
        b = spool.put("", ["alice@home.test"], MESSAGE, kind="bounce")
        return [a, b]
    finally:
        spool.close()


def test_list_text_and_json_without_a_relay(tmp_path: Path) -> None:
    a, b = filled(tmp_path)
    code, out, _ = run("list", "--spool", str(tmp_path))
    assert code == 0
    assert a.id in out and b.id in out
    assert "<alice@home.test>" in out and "-> <bob@ok.test>  pending" in out
    assert "isp: 451 4.3.0 later" in out and "attempts 2" in out and "(bounce)" in out
    assert "-- 2 messages" in out
    code, out, _ = run("list", "--spool", str(tmp_path), "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["count"] == 2 and doc["relay_pid"] is None
    first = doc["messages"][0]
    assert first["id"] == a.id and first["sender"] == "alice@home.test"
    assert first["recipients"][0] == {"address": "bob@ok.test", "status": "pending",
                                      "replies": {"isp": "451 4.3.0 later"}}
    assert first["last_replies"] == {"isp": "451 4.3.0 later"}
    assert first["next_attempt"] == a.arrival + 600 and first["age"] >= 0


def test_show_retry_delete_without_a_relay(tmp_path: Path) -> None:
    a, b = filled(tmp_path)
    code, out, _ = run("show", a.id, "--spool", str(tmp_path))
    assert code == 0 and "Subject: test" in out and "isp: 451 4.3.0 later" in out
    code, out, _ = run("show", a.id, "--spool", str(tmp_path), "--format", "json")
    assert json.loads(out)["headers"].startswith("From: alice@home.test")
    code, out, _ = run("retry", a.id, "--spool", str(tmp_path))
    assert code == 0 and "as soon as the relay starts" in out
    entry = read_entry(tmp_path, a.id)
    assert entry.state.next_attempt < a.arrival + 600 and entry.state.attempts == 2
    code, out, _ = run("delete", b.id, "--spool", str(tmp_path))
    assert code == 0 and f"{b.id}: deleted" in out
    assert not (tmp_path / "msg" / b.id).exists()
    code, out, _ = run("retry", "--all", "--spool", str(tmp_path), "--format", "json")
    assert code == 0 and json.loads(out) == {"ok": True, "message": "1 message(s) will be delivered as soon as the relay starts"}


def test_unknown_ids_and_usage_errors(tmp_path: Path) -> None:
    filled(tmp_path)
    for argv in (["show", "0000018C2F3A4B5C6D7E"], ["delete", "0000018C2F3A4B5C6D7E"],
                 ["retry", "0000018C2F3A4B5C6D7E"], ["delete", "../../etc/passwd"]):
        code, out, err = run(*argv, "--spool", str(tmp_path))
        assert code == 1, argv
        assert "no message" in err and "Traceback" not in err
    assert run("retry", "--spool", str(tmp_path))[0] == 2
    assert run("frobnicate", "--spool", str(tmp_path))[0] == 2
    assert run("list", "--format", "yaml", "--spool", str(tmp_path))[0] == 2
    code, _, err = run("list", "--spool", str(tmp_path / "nowhere"))
    assert code == 1 and "no spool" in err


async def test_list_retry_delete_while_the_relay_runs(tmp_path: Path) -> None:
    async with FakeSmtp() as sink:
        sink.fail_local("bob", "451")
        sink.fail_local("dave", "451")
        engines = {"isp": smarthost("isp", sink.port, CTX)}
        # a long backoff: only an operator's retry brings the message back soon
        async with running(tmp_path, Table(("isp",)), engines, min_backoff=600, max_backoff=600) as (sched, spool):
            keep = await spool.accept("alice@home.test", ["bob@ok.test"], MESSAGE)
            drop = await spool.accept("alice@home.test", ["dave@ok.test"], MESSAGE)
            sched.wake(keep)
            sched.wake(drop)
            await until(lambda: all(spool.state(m.id).attempts == 1 for m in (keep, drop) if spool.get(m.id)),
                        what="both messages deferred once")

            code, out, _ = await asyncio.to_thread(run, "list", "--spool", str(tmp_path), "--format", "json")
            doc = json.loads(out)
            assert code == 0 and doc["count"] == 2 and doc["relay_pid"] is not None
            assert all(m["last_replies"]["isp"].startswith("451 4.3.0") for m in doc["messages"])

            # delete goes through the control folder; the relay does it
            code, out, err = await asyncio.to_thread(run, "delete", drop.id, "--spool", str(tmp_path))
            assert code == 0, err
            assert spool.get(drop.id) is None and not (tmp_path / "msg" / drop.id).exists()

            code, _, err = await asyncio.to_thread(run, "delete", drop.id, "--spool", str(tmp_path))
            assert code == 1 and "no message" in err

            # retry --all: the relay tries again at once (and it fails again, still 451)
            code, out, err = await asyncio.to_thread(run, "retry", "--all", "--spool", str(tmp_path))
            assert code == 0 and "1 message(s) scheduled" in out, err
            await until(lambda: spool.state(keep.id).attempts == 2, what="a second attempt")

            sink.heal()
            code, out, err = await asyncio.to_thread(run, "retry", keep.id, "--spool", str(tmp_path))
            assert code == 0 and "scheduled for delivery now" in out
            got = await sink.wait_for(1)
            assert got[0].recipients == ["bob@ok.test"]
            await until(lambda: not spool.messages())
            assert list((tmp_path / "control").iterdir()) == []
        assert [m.recipients for m in sink.messages] == [["bob@ok.test"]]
