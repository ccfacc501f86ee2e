"""The scheduler against real aiosmtpd sinks in this loop and the real smarthost engine."""
from __future__ import annotations

import asyncio
import email
import email.policy
import logging
from pathlib import Path

import pytest

from server.engines.base import EngineContext
from server.outcome import Kind, Outcome
from tests.queue.support import MESSAGE, Table, running, smarthost, until
from tests.support.fake_smtp import FakeSmtp, unused_port

CTX = EngineContext(hostname="relay.test")


def parsed(msg):
    return email.message_from_bytes(msg.data, policy=email.policy.default)


def dsn_blocks(msg):
    report = parsed(msg)
    assert report.get_content_type() == "multipart/report"
    return list(report.iter_parts())[1].get_payload()


async def test_delivered_and_removed(tmp_path: Path) -> None:
    async with FakeSmtp() as sink:
        async with running(tmp_path, Table(("isp",)), {"isp": smarthost("isp", sink.port, CTX)}) as (sched, spool):
            msg = await spool.accept("alice@home.test", ["bob@ok.test", "carol@ok.test"], MESSAGE)
            sched.wake(msg)
            got = await sink.wait_for(1)
            assert got[0].sender == "alice@home.test"
            assert sorted(got[0].recipients) == ["bob@ok.test", "carol@ok.test"]
            assert got[0].data.replace(b"\r\n", b"\n").endswith(b"hello\n")
            await until(lambda: not spool.messages(), what="the spool to empty")
            assert not list(spool.msg_dir.iterdir()) and not list(spool.state_dir.iterdir())
        assert len(sink.messages) == 1


async def test_failover_to_the_next_engine_and_the_log_line(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="routedsl.scheduler")
    down = unused_port()
    async with FakeSmtp() as sink:
        engines = {"down": smarthost("down", down, CTX), "isp": smarthost("isp", sink.port, CTX)}
        table = Table(("isp",), {"ok.test": ("down", "isp")})
        async with running(tmp_path, table, engines) as (sched, spool):
            msg = await spool.accept("alice@home.test", ["bob@ok.test"], MESSAGE)
            sched.wake(msg)
            await sink.wait_for(1)
            await until(lambda: not spool.messages())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(msg.id)]
    first = next(line for line in lines if "engine=down" in line)
    assert "to=<bob@ok.test>" in first and "rule=routes.rules:10" in first
    assert "rules=0123456789ab" in first and "result=temporary" in first and "duration=" in first
    second = next(line for line in lines if "engine=isp" in line)
    assert "result=delivered" in second and 'reply="250' in second


async def test_engine_missing_from_the_snapshot_is_an_engine_fault(tmp_path: Path) -> None:
    async with FakeSmtp() as sink:
        table = Table(("gone", "isp"))
        async with running(tmp_path, table, {"isp": smarthost("isp", sink.port, CTX)}) as (sched, spool):
            sched.wake(await spool.accept("alice@home.test", ["bob@ok.test"], MESSAGE))
            await sink.wait_for(1)
            await until(lambda: not spool.messages())


async def test_recipients_split_by_plan_one_transaction_each(tmp_path: Path) -> None:
    async with FakeSmtp() as a, FakeSmtp() as b:
        engines = {"a": smarthost("a", a.port, CTX), "b": smarthost("b", b.port, CTX)}
        table = Table(("b",), {"aol.test": ("a", "b")})
        async with running(tmp_path, table, engines) as (sched, spool):
            msg = await spool.accept("alice@home.test", ["x@aol.test", "y@ok.test", "z@aol.test", "w@else.test"],
                                     MESSAGE)
            sched.wake(msg)
            await a.wait_for(1)
            await b.wait_for(1)
            await until(lambda: not spool.messages())
        assert len(a.messages) == 1 and sorted(a.messages[0].recipients) == ["x@aol.test", "z@aol.test"]
        assert len(b.messages) == 1 and sorted(b.messages[0].recipients) == ["w@else.test", "y@ok.test"]


async def test_retry_then_success_records_state_between(tmp_path: Path) -> None:
    async with FakeSmtp() as sink:
        sink.fail_local("bob", "451", times=2)
        async with running(tmp_path, Table(("isp",)), {"isp": smarthost("isp", sink.port, CTX)}) as (sched, spool):
            msg = await spool.accept("alice@home.test", ["bob@ok.test"], MESSAGE)
            sched.wake(msg)
            # between attempts, the state on disk names the engine and its reply
            state_file = spool.state_dir / f"{msg.id}.json"
            await until(state_file.exists, what="a state file after the first deferral")
            assert "451 4.3.0" in state_file.read_text()
            got = await sink.wait_for(1)
            await until(lambda: not spool.messages())
        assert got[0].recipients == ["bob@ok.test"]
        assert len(sink.messages) == 1  # and no bounce
        assert sum(1 for c in sink.commands if c == "RCPT") == 3


async def test_unknown_user_bounces_once_and_is_not_retried(tmp_path: Path) -> None:
    async with FakeSmtp() as sink:
        sink.fail_local("nobody", "550 5.1.1 <nobody@ok.test>: no such user")
        async with running(tmp_path, Table(("isp", "backup")), {
                "isp": smarthost("isp", sink.port, CTX),
                "backup": smarthost("backup", sink.port, CTX)}) as (sched, spool):
            msg = await spool.accept("alice@home.test", ["nobody@ok.test", "bob@ok.test"], MESSAGE)
            sched.wake(msg)
            await sink.wait_for(2)
            await until(lambda: not spool.messages(), what="message and bounce to leave the queue")
        delivered, bounce = sorted(sink.messages, key=lambda m: m.sender == "")
        assert delivered.recipients == ["bob@ok.test"]
        assert bounce.sender == "" and bounce.recipients == ["alice@home.test"]
        report = parsed(bounce)
        assert report["Auto-Submitted"] == "auto-replied"
        blocks = dsn_blocks(bounce)
        assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; nobody@ok.test"]
        assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.1.1"
        assert "no such user" in blocks[1]["Diagnostic-Code"]
        # a destination verdict: the backup engine was never tried for it, and no retry
        rcpts = [c for c in sink.commands if c == "RCPT"]
        assert len(rcpts) == 3  # nobody once, bob once, alice (the bounce) once
        assert len(sink.messages) == 2


async def test_every_engine_permanent_bounces_naming_each(tmp_path: Path) -> None:
    async with FakeSmtp() as a, FakeSmtp() as b, FakeSmtp() as home:
        a.fail("MAIL", "554 5.7.1 relay access denied")
        b.fail("DATA", "552 5.3.4 too big for us")
        engines = {"a": smarthost("a", a.port, CTX), "b": smarthost("b", b.port, CTX),
                   "home": smarthost("home", home.port, CTX)}
        table = Table(("a", "b"), {"home.test": ("home",)})
        async with running(tmp_path, table, engines) as (sched, spool):
            sched.wake(await spool.accept("alice@home.test", ["bob@ok.test"], MESSAGE))
            bounces = await home.wait_for(1)
            await until(lambda: not spool.messages())
        text = list(parsed(bounces[0]).iter_parts())[0].get_content()
        assert "engine a: 554 5.7.1 relay access denied" in text
        assert "engine b: 552 5.3.4 too big for us" in text
        assert dsn_blocks(bounces[0])[1]["Status"] == "5.3.4"


async def test_queue_lifetime_passed_bounces(tmp_path: Path) -> None:
    async with FakeSmtp() as sink, FakeSmtp() as home:
        sink.fail_local("bob", "451")
        engines = {"isp": smarthost("isp", sink.port, CTX), "home": smarthost("home", home.port, CTX)}
        table = Table(("isp",), {"home.test": ("home",)})
        async with running(tmp_path, table, engines, queue_lifetime=0.3) as (sched, spool):
            sched.wake(await spool.accept("alice@home.test", ["bob@ok.test"], MESSAGE))
            bounces = await home.wait_for(1)
            await until(lambda: not spool.messages())
        block = dsn_blocks(bounces[0])[1]
        assert block["Action"] == "failed" and block["Status"] == "4.3.0"
        assert "451 4.3.0" in block["Diagnostic-Code"]
        assert sum(1 for c in sink.commands if c == "RCPT") >= 2  # it was retried before giving up
        assert sink.messages == []


@pytest.mark.parametrize("kind", ["mail", "bounce"])
async def test_no_bounce_to_the_null_sender(tmp_path: Path, caplog, kind: str) -> None:
    caplog.set_level(logging.INFO, logger="routedsl.scheduler")
    async with FakeSmtp() as sink:
        sink.fail_local("nobody", "550")
        async with running(tmp_path, Table(("isp",)), {"isp": smarthost("isp", sink.port, CTX)}) as (sched, spool):
            msg = await spool.accept("", ["nobody@ok.test"], MESSAGE, kind=kind)
            sched.wake(msg)
            await until(lambda: not spool.messages())
        assert sink.messages == []
        assert any("discarded" in r.getMessage() and msg.id in r.getMessage() for r in caplog.records)


async def test_delay_notice_goes_out_once(tmp_path: Path) -> None:
    async with FakeSmtp() as sink, FakeSmtp() as home:
        sink.fail_local("bob", "451")
        engines = {"isp": smarthost("isp", sink.port, CTX), "home": smarthost("home", home.port, CTX)}
        table = Table(("isp",), {"home.test": ("home",)})
        async with running(tmp_path, table, engines, delay_warning=0.1, max_backoff=0.06) as (sched, spool):
            msg = await spool.accept("alice@home.test", ["bob@ok.test"], MESSAGE)
            sched.wake(msg)
            notices = await home.wait_for(1)
            seen = spool.state(msg.id).attempts
            await until(lambda: spool.get(msg.id) and spool.state(msg.id).attempts >= seen + 3,
                        what="three more attempts after the notice")
            assert spool.state(msg.id).delay_notified
        assert len(home.messages) == 1
        block = dsn_blocks(notices[0])[1]
        assert block["Action"] == "delayed" and block["Will-Retry-Until"]
        assert parsed(notices[0])["Subject"].startswith("Delayed Mail")


class GateEngine:
    """Holds every delivery until `want` are in flight at once: proves concurrency without timing."""

    def __init__(self, want: int) -> None:
        self.name = "gate"
        self.spec = None
        self.want = want
        self.in_flight = 0
        self.peak = 0
        self.delivered: list[str] = []
        self.gate = asyncio.Event()

    async def deliver(self, envelope, recipients):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.in_flight >= self.want:
            self.gate.set()
        try:
            await asyncio.wait_for(self.gate.wait(), 10)
        finally:
            self.in_flight -= 1
        self.delivered.append(envelope.queue_id)
        return {r: Outcome(Kind.DELIVERED, 250, "2.0.0", "ok", self.name, None) for r in recipients}

    async def aclose(self) -> None:
        pass


async def test_many_messages_in_flight_at_once(tmp_path: Path) -> None:
    gate = GateEngine(want=20)
    async with running(tmp_path, Table(("gate",)), {"gate": gate}, concurrency=50) as (sched, spool):
        msgs = await asyncio.gather(*(spool.accept("a@home.test", [f"r{i}@ok.test"], MESSAGE) for i in range(40)))
        for m in msgs:
            sched.wake(m)
        await until(lambda: len(gate.delivered) == 40)
        await until(lambda: not spool.messages())
    assert gate.peak >= 20


async def test_concurrency_is_bounded(tmp_path: Path) -> None:
    gate = GateEngine(want=1000)  # never opens by count; the bound shows as the peak
    async with running(tmp_path, Table(("gate",)), {"gate": gate}, concurrency=5) as (sched, spool):
        msgs = [await spool.accept("a@home.test", [f"r{i}@ok.test"], MESSAGE) for i in range(12)]
        for m in msgs:
            sched.wake(m)
        await until(lambda: gate.in_flight == 5)
        assert sched.in_flight == 5
        gate.gate.set()
        await until(lambda: len(gate.delivered) == 12)
    assert gate.peak == 5


async def test_restart_resumes_waiting_messages(tmp_path: Path) -> None:
    async with FakeSmtp() as sink:
        from server.queue import Spool
        spool = Spool(tmp_path)
        spool.open()
        spool.put("alice@home.test", ["bob@ok.test"], MESSAGE)
        spool.close()
        async with running(tmp_path, Table(("isp",)), {"isp": smarthost("isp", sink.port, CTX)}) as (sched, spool):
            await sink.wait_for(1)
            await until(lambda: not spool.messages())


async def test_a_state_write_failure_keeps_the_message_queued(tmp_path: Path, caplog) -> None:
    import errno
    async with FakeSmtp() as sink:
        sink.fail_local("bob", "451", times=1)
        async with running(tmp_path, Table(("isp",)), {"isp": smarthost("isp", sink.port, CTX)}) as (sched, spool):
            real_record = spool.record
            failures = []

            async def full_disk_once(state):
                if not failures:
                    failures.append(state.id)
                    raise OSError(errno.ENOSPC, "No space left on device")
                await real_record(state)

            spool.record = full_disk_once  # type: ignore[method-assign]
            msg = await spool.accept("alice@home.test", ["bob@ok.test"], MESSAGE)
            sched.wake(msg)
            got = await sink.wait_for(1)
            await until(lambda: not spool.messages())
        assert failures == [msg.id]
        assert got[0].recipients == ["bob@ok.test"]
        assert any("stays queued" in r.getMessage() for r in caplog.records)


async def test_a_smarthost_that_fails_as_a_whole_is_skipped_for_a_while(tmp_path: Path) -> None:
    async with FakeSmtp() as dead, FakeSmtp() as good:
        dead.fail("GREETING", "421")
        engines = {"dead": smarthost("dead", dead.port, CTX), "good": smarthost("good", good.port, CTX)}
        async with running(tmp_path, Table(("dead", "good")), engines, min_backoff=30, max_backoff=60) as (sched, spool):
            for i in range(5):
                sched.wake(await spool.accept("alice@home.test", [f"r{i}@ok.test"], MESSAGE))
                await good.wait_for(i + 1)
            await until(lambda: not spool.messages())
        # the first message found it dead; the four after it went straight to the next engine
        assert dead.connections == 1
        assert len(good.messages) == 5


async def test_with_a_compiled_rules_file(tmp_path: Path, caplog) -> None:
    import routedsl
    caplog.set_level(logging.INFO, logger="routedsl.scheduler")
    async with FakeSmtp() as a, FakeSmtp() as b:
        text = (f"engine a = smtp://127.0.0.1:{a.port} tls none\n"
                f"engine b = smtp://127.0.0.1:{b.port} tls none\n"
                "if destination is aol.test then try b first\n"
                "if from is <> then use only a\n")
        table = routedsl.compile_text(text)
        engines = {"a": smarthost("a", a.port, CTX), "b": smarthost("b", b.port, CTX)}
        b.fail_local("nobody", "550")
        async with running(tmp_path, table, engines) as (sched, spool):
            msg = await spool.accept("alice@home.test", ["x@aol.test", "y@ok.test", "nobody@aol.test"], MESSAGE)
            sched.wake(msg)
            await b.wait_for(1)
            await a.wait_for(2)                      # y@ok.test by default order, then the bounce
            await until(lambda: not spool.messages())
        assert b.messages[0].recipients == ["x@aol.test"]
        plain, bounce = sorted(a.messages, key=lambda m: m.sender == "")
        assert plain.recipients == ["y@ok.test"] and bounce.sender == ""
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"{msg.id} to=<x@aol.test>,<nobody@aol.test> engine=b rule=routes.rules:3 rules={table.version}" in line
               for line in lines), lines
    assert any("engine=a rule=routes.rules:4" in line for line in lines)   # the bounce, by `from is <>`


async def test_drained_waits_for_attempts_that_use_a_snapshot(tmp_path: Path) -> None:
    gate = GateEngine(want=1000)
    async with running(tmp_path, Table(("gate",)), {"gate": gate}) as (sched, spool):
        snap = sched._snapshot()
        sched.wake(await spool.accept("a@home.test", ["r@ok.test"], MESSAGE))
        await until(lambda: gate.in_flight == 1)
        waiter = asyncio.create_task(sched.drained(snap))
        await asyncio.sleep(0)
        assert not waiter.done()
        other = Table(("gate",))
        from server.snapshot import Snapshot
        await asyncio.wait_for(sched.drained(Snapshot(other, {}, "x", 0.0)), 5)  # not in use: at once
        gate.gate.set()
        await asyncio.wait_for(waiter, 5)
        await until(lambda: not spool.messages())


async def test_partial_acceptance_delivers_retries_and_bounces_each_recipient_once(tmp_path: Path) -> None:
    async with FakeSmtp() as sink, FakeSmtp() as home:
        sink.fail_local("r2", "451", times=1)
        sink.fail_local("r3", "550")
        engines = {"isp": smarthost("isp", sink.port, CTX), "home": smarthost("home", home.port, CTX)}
        table = Table(("isp",), {"home.test": ("home",)})
        async with running(tmp_path, table, engines) as (sched, spool):
            sched.wake(await spool.accept("alice@home.test", ["r1@ok.test", "r2@ok.test", "r3@ok.test"], MESSAGE))
            await sink.wait_for(2)
            bounces = await home.wait_for(1)
            await until(lambda: not spool.messages())
        assert [m.recipients for m in sink.messages] == [["r1@ok.test"], ["r2@ok.test"]]
        assert len(home.messages) == 1
        blocks = dsn_blocks(bounces[0])
        assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; r3@ok.test"]


async def test_a_step_with_only_temporary_failures_is_kept_with_the_deferral(tmp_path: Path) -> None:
    # engine 1 is down, engine 2 answers 451: no step is written on its own, yet the deferral
    # that ends the attempt leaves both engines' replies on disk (what `routedsl queue` shows)
    down = unused_port()
    async with FakeSmtp() as sink:
        sink.fail("MAIL", "451 4.3.0 try again later")
        engines = {"down": smarthost("down", down, CTX), "isp": smarthost("isp", sink.port, CTX)}
        table = Table(("isp",), {"ok.test": ("down", "isp")})
        async with running(tmp_path, table, engines) as (sched, spool):
            writes = []
            real = spool._replace_state_file
            spool._replace_state_file = lambda state: (writes.append(state), real(state))[1]
            msg = await spool.accept("alice@home.test", ["bob@ok.test"], MESSAGE)
            sched.wake(msg)
            state_file = spool.state_dir / f"{msg.id}.json"
            await until(state_file.exists, what="the deferral's state file")
            text = state_file.read_text()
    assert len(writes) == 1 and writes[0].attempts == 1
    assert '"down"' in text and "451 4.3.0" in text
