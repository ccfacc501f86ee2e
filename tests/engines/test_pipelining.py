"""One transaction, pipelined (RFC 2920) or one command at a time: the same outcomes.

Every behaviour test runs against a fake that offers PIPELINING (added to aiosmtpd's EHLO,
which processes pipelined commands in order but does not advertise it) and one that does not; `pipelined` checks that the group really went out in one write. Also:
no RSET on a connection that just finished cleanly, RSET after it idled, a pooled
connection found dead before MAIL replaced without losing the delivery, and the pool's
hand-over to waiters.
"""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

import server.engines.base as base
from server.engines.base import ConnectionPool, build_engine
from server.engines.wire import payload
from server.outcome import Kind
from tests.engines.helpers import context, envelope, smarthost_spec
from tests.support.fake_smtp import FakeSmtp, _Handler, _Session


class _Watching:
    """The fake's handler, offering PIPELINING in EHLO when asked and noting its use."""

    def __init__(self, fake: "Fake", inner: _Handler) -> None:
        self.fake, self.inner = fake, inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        responses = await self.inner.handle_EHLO(server, session, envelope, hostname, responses)
        if self.fake.offer_pipelining and responses and responses[0].startswith("250"):
            # aiosmtpd reads commands in order but does not say so: add it before the last line
            responses = responses[:-1] + ["250-PIPELINING"] + responses[-1:]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, options):
        # with PIPELINING the RCPTs and DATA are already waiting when MAIL is handled
        waiting = bytes(getattr(server._reader, "_buffer", b""))
        self.fake.grouped.append(b"RCPT" in waiting and b"DATA" in waiting)
        return await self.inner.handle_MAIL(server, session, envelope, address, options)


class Fake(FakeSmtp):
    def __init__(self, *args: Any, pipelining: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.offer_pipelining = pipelining
        self.grouped: list[bool] = []

    def _factory(self):  # type: ignore[no-untyped-def]
        session = super()._factory()
        if isinstance(session, _Session):  # aiosmtpd looks its hooks up once, per session
            watching = _Watching(self, session.event_handler)
            session._handle_hooks.update(EHLO=watching.handle_EHLO, MAIL=watching.handle_MAIL)
        return session


@pytest.fixture(params=[True, False], ids=["pipelined", "one-by-one"])
def pipelining(request) -> bool:
    return request.param


def _engine(fake: FakeSmtp, **options: Any):
    spec = smarthost_spec(port=fake.port, host=fake.host, tls="none", **options)
    return build_engine(spec, None, context(final_timeout=5.0))


async def _send(fake: FakeSmtp, rcpts, **options: Any):
    engine = _engine(fake, **options)
    try:
        return await engine.deliver(envelope(), list(rcpts))
    finally:
        await engine.aclose()


async def test_the_group_goes_out_in_one_write_only_when_offered(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        got = await _send(fake, ["a@ok.test", "b@ok.test"])
        assert all(o.delivered for o in got.values())
        assert fake.grouped == [pipelining]
        assert [m.recipients for m in fake.messages] == [["a@ok.test", "b@ok.test"]]


async def test_partial_refusal_and_an_unknown_user_among_accepted(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        fake.fail_local("busy", "451 4.2.0 mailbox busy")
        fake.fail_local("gone", "550 5.1.1 no such user")
        rcpts = ["one@ok.test", "busy@ok.test", "gone@ok.test", "two@ok.test"]
        got = await _send(fake, rcpts)
        assert got["one@ok.test"].delivered and got["two@ok.test"].delivered
        assert got["busy@ok.test"].temporary and got["busy@ok.test"].enhanced == "4.2.0"
        gone = got["gone@ok.test"]
        assert gone.final and gone.code == 550 and gone.enhanced == "5.1.1"
        assert [m.recipients for m in fake.messages] == [["one@ok.test", "two@ok.test"]]


async def test_every_recipient_refused_sends_no_message_and_keeps_the_connection(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        engine = _engine(fake)
        fake.fail("RCPT", "550", times=2)
        first = await engine.deliver(envelope(), ["a@ok.test", "b@ok.test"])
        second = await engine.deliver(envelope(), ["c@ok.test"])
        await engine.aclose()
        assert all(o.final and o.code == 550 for o in first.values())
        assert second["c@ok.test"].delivered
        assert [m.recipients for m in fake.messages] == [["c@ok.test"]]
        assert fake.connections == 1


async def test_refused_sender_refuses_everyone_and_the_connection_stays_usable(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        engine = _engine(fake)
        fake.fail("MAIL", "554 5.7.1 sender rejected", times=1)
        first = await engine.deliver(envelope(), ["a@ok.test", "b@ok.test"])
        second = await engine.deliver(envelope(), ["a@ok.test"])
        await engine.aclose()
        assert {(o.kind, o.code, o.enhanced) for o in first.values()} == {(Kind.PERMANENT, 554, "5.7.1")}
        assert second["a@ok.test"].delivered and fake.connections == 1
        assert len(fake.messages) == 1


async def test_refused_content_applies_to_every_accepted_recipient(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        fake.fail("DATA", "554 5.7.1 rejected as spam")
        fake.fail_local("gone", "550 5.1.1 no such user")
        got = await _send(fake, ["a@ok.test", "gone@ok.test", "b@ok.test"])
        assert got["gone@ok.test"].final
        assert {(got[r].code, got[r].final) for r in ("a@ok.test", "b@ok.test")} == {(554, False)}


async def test_data_command_refused_before_354(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        fake.fail("DATACMD", "451 4.3.0 try later", times=1)
        engine = _engine(fake)
        first = await engine.deliver(envelope(), ["a@ok.test"])
        second = await engine.deliver(envelope(), ["a@ok.test"])
        await engine.aclose()
        assert first["a@ok.test"].temporary and first["a@ok.test"].code == 451
        assert second["a@ok.test"].delivered and fake.connections == 1


async def test_421_at_a_recipient_fails_everyone_temporarily(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        fake.fail_local("second", "421")
        got = await _send(fake, ["first@ok.test", "second@ok.test", "third@ok.test"])
        assert {(o.kind, o.final) for o in got.values()} == {(Kind.TEMPORARY, False)}
        assert not fake.messages


async def test_too_many_recipients_go_in_a_second_transaction(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        fake.fail_local("c", "452 4.5.3 Too many recipients", times=1)
        got = await _send(fake, ["a@ok.test", "b@ok.test", "c@ok.test"])
        assert all(o.delivered for o in got.values()), got
        assert [m.recipients for m in fake.messages] == [["a@ok.test", "b@ok.test"], ["c@ok.test"]]


async def test_a_garbled_reply_drops_the_connection(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        engine = _engine(fake)
        fake.fail("RCPT", "abc", times=1)
        first = await engine.deliver(envelope(), ["a@ok.test"])
        second = await engine.deliver(envelope(), ["a@ok.test"])
        await engine.aclose()
        assert first["a@ok.test"].temporary and first["a@ok.test"].code is None
        assert second["a@ok.test"].delivered and fake.connections == 2


async def test_no_reply_to_the_final_dot_is_temporary(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        fake.fail("DATA", "drop")
        got = await _send(fake, ["a@ok.test"])
        assert got["a@ok.test"].temporary


async def test_a_recipient_that_cannot_be_sent_is_refused_locally(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        got = await _send(fake, ["a@ok.test", "jürgen@ok.test"])  # no SMTPUTF8 offered
        assert got["a@ok.test"].delivered
        assert got["jürgen@ok.test"].permanent and got["jürgen@ok.test"].code == 553
        assert [m.recipients for m in fake.messages] == [["a@ok.test"]]


async def test_reuse_sends_no_rset_after_a_clean_transaction(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        engine = _engine(fake)
        for i in range(3):
            got = await engine.deliver(envelope(queue_id=f"Q{i}"), ["a@ok.test"])
            assert got["a@ok.test"].delivered
        await engine.aclose()
        assert fake.connections == 1 and len(fake.messages) == 3
        assert "RSET" not in fake.commands


async def test_a_connection_idle_for_a_while_is_checked_with_rset(monkeypatch):
    monkeypatch.setattr(base, "RSET_AFTER_IDLE", 0.0)
    async with Fake() as fake:
        engine = _engine(fake)
        for i in range(2):
            assert (await engine.deliver(envelope(queue_id=f"Q{i}"), ["a@ok.test"]))["a@ok.test"].delivered
        await engine.aclose()
        assert fake.commands.count("RSET") == 1 and fake.connections == 1


@pytest.mark.parametrize("how", ["drop", "421"])
async def test_a_pooled_connection_dead_at_mail_is_replaced(pipelining, how):
    """The server closed the idle connection (restart, idle timeout): the MAIL on it gets no
    reply or a 421. Nothing was accepted, so the message goes on a new connection at once."""
    async with Fake(pipelining=pipelining) as fake:
        engine = _engine(fake)
        assert (await engine.deliver(envelope(queue_id="Q1"), ["a@ok.test"]))["a@ok.test"].delivered
        fake.fail("MAIL", how, times=1)
        got = await engine.deliver(envelope(queue_id="Q2"), ["a@ok.test", "b@ok.test"])
        await engine.aclose()
        assert all(o.delivered for o in got.values()), got
        assert fake.connections == 2 and len(fake.messages) == 2


async def test_a_pooled_connection_dead_before_any_recipient_was_accepted_is_replaced(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        engine = _engine(fake)
        assert (await engine.deliver(envelope(queue_id="Q1"), ["a@ok.test"]))["a@ok.test"].delivered
        fake.fail_local("a", "drop", times=1)
        got = await engine.deliver(envelope(queue_id="Q2"), ["a@ok.test", "b@ok.test"])
        await engine.aclose()
        assert all(o.delivered for o in got.values()), got
        assert fake.connections == 2 and [m.recipients for m in fake.messages][-1] == ["a@ok.test", "b@ok.test"]


async def test_a_fresh_connection_dead_at_mail_is_not_retried(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        fake.fail("MAIL", "421")
        got = await _send(fake, ["a@ok.test"])
        assert got["a@ok.test"].temporary and fake.connections == 1


async def test_a_dead_connection_after_a_recipient_was_accepted_is_not_retried(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        engine = _engine(fake)
        assert (await engine.deliver(envelope(queue_id="Q1"), ["a@ok.test"]))["a@ok.test"].delivered
        fake.fail_local("b", "drop", times=1)
        got = await engine.deliver(envelope(queue_id="Q2"), ["a@ok.test", "b@ok.test"])
        await engine.aclose()
        assert {o.kind for o in got.values()} == {Kind.TEMPORARY}
        assert fake.connections == 1 and len(fake.messages) == 1


async def test_exactly_connections_deliveries_work_at_once():
    async with Fake() as fake:
        fake.fail("DATA", "delay 0.2")
        engine = _engine(fake, connections=3)
        results = await asyncio.gather(*(engine.deliver(envelope(queue_id=f"Q{i}"), [f"r{i}@ok.test"])
                                         for i in range(9)))
        await engine.aclose()
        assert all(r[f"r{i}@ok.test"].delivered for i, r in enumerate(results))
        assert fake.peak == 3 and fake.connections == 3 and len(fake.messages) == 9


class _Conn:
    def __init__(self) -> None:
        self.is_connected = True

    def close(self) -> None:
        self.is_connected = False


async def test_pool_hands_a_freed_connection_to_the_first_waiter_and_reuses_the_warmest():
    pool = ConnectionPool(limit=2, idle_timeout=30)
    a, b = _Conn(), _Conn()
    assert await pool.checkout("k") is None and await pool.checkout("k") is None
    first = asyncio.ensure_future(pool.checkout("k"))
    second = asyncio.ensure_future(pool.checkout("k"))
    await asyncio.sleep(0)
    pool.checkin("k", a, True)   # straight to the first waiter, not parked
    assert await first is a and not second.done()
    pool.checkin("k", b, False)  # closed: its slot goes to the second waiter
    assert await second is None and pool.open_connections == 2
    c = _Conn()
    pool.checkin("k", a, True)
    pool.checkin("k", c, True)
    assert await pool.checkout("k") is c  # last in, first out
    pool.checkin("k", c, True)
    await pool.aclose()


async def test_pool_waiter_that_leaves_passes_its_turn_on():
    pool = ConnectionPool(limit=1, idle_timeout=30)
    a = _Conn()
    assert await pool.checkout("k") is None
    leaving = asyncio.ensure_future(pool.checkout("k"))
    staying = asyncio.ensure_future(pool.checkout("k"))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    pool.checkin("k", a, True)
    assert await staying is a and pool.open_connections == 1
    pool.checkin("k", a, True)
    await pool.aclose()


@pytest.mark.parametrize("data", [
    b"a\r\nb\r\n", b"a\nb", b"a\rb\r\n", b".x\r\n..y\r\nz\r\n", b"a\r\n.\r\n", b"", b"x\r\n\r\n.",
])
def test_payload_is_what_aiosmtplib_would_send(data):
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
    assert payload(data) == PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_pipelined_over_tls(tls):
    from tests.support import certs
    async with Fake(tls=tls) as fake:
        spec = smarthost_spec(port=fake.port, host=fake.host, kind="smtps" if tls == "implicit" else "smtp",
                              tls="implicit" if tls == "implicit" else "required")
        engine = build_engine(spec, None, context(ca_file=certs.ca_file(), final_timeout=5.0))
        fake.fail_local("gone", "550 5.1.1 no such user")
        for i in range(2):
            got = await engine.deliver(envelope(queue_id=f"Q{i}"), ["a@ok.test", "gone@ok.test"])
            assert got["a@ok.test"].delivered and got["gone@ok.test"].final
        await engine.aclose()
        assert fake.grouped == [True, True] and fake.connections == 1
        assert all(m.tls for m in fake.messages) and len(fake.messages) == 2


def test_a_relay_without_direct_delivery_never_loads_dnspython():
    """4 MiB of memory: dnspython comes in only with the direct engine or an `mx` rule."""
    import subprocess
    import sys
    code = ("import sys, server.app, server.engines.base, server.engines.smarthost, server.outcome as oc\n"
            "oc.classify(OSError('x'), engine='e', host=None, stage=oc.Stage.CONNECT)\n"
            "print(sorted(m for m in sys.modules if m == 'dns' or m.startswith('dns.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_dns_errors_are_still_classified_once_dnspython_is_loaded():
    import dns.exception
    import dns.resolver

    from server import outcome as oc
    nx = oc.classify(dns.resolver.NXDOMAIN(qnames=["gone.test."]), engine="d", host=None, stage=oc.Stage.DNS)
    assert nx.final and nx.code == 550 and "gone.test" in nx.text
    assert oc.classify(dns.exception.Timeout(), engine="d", host=None, stage=oc.Stage.DNS).temporary
    assert oc.classify(dns.resolver.NoAnswer(), engine="d", host=None, stage=oc.Stage.DNS).enhanced == "4.4.3"


async def test_a_hostile_multiline_reply_is_cleaned_when_pipelined():
    from tests.support.fake_smtp import EVIL_REPLY
    async with Fake() as fake:
        fake.fail_local("evil", EVIL_REPLY)
        got = await _send(fake, ["a@ok.test", "evil@ok.test"])
        text = got["evil@ok.test"].text
        assert got["a@ok.test"].delivered and got["evil@ok.test"].final
        assert "\x1b" not in text and "\r" not in text and "\n" not in text


async def test_more_replies_than_commands_are_not_kept_and_end_the_session():
    """A server that answers twice (or floods replies) is out of step: the extra replies
    are dropped as they come, and the connection is not used again."""
    async with Fake() as fake:
        fake.fail("MAIL", "250 2.1.0 Ok\r\n" + "250 2.0.0 extra\r\n" * 2000 + "250 2.1.0 Ok", times=1)
        engine = _engine(fake)
        first = await engine.deliver(envelope(queue_id="Q1"), ["a@ok.test"])
        second = await engine.deliver(envelope(queue_id="Q2"), ["b@ok.test"])
        await engine.aclose()
        assert first["a@ok.test"].temporary  # DATA "answered" 250: out of step, not a delivery
        assert second["b@ok.test"].delivered and fake.connections == 2
        assert [m.recipients for m in fake.messages] == [["b@ok.test"]]


async def test_a_success_in_reply_to_the_data_command_is_not_a_delivery(pipelining):
    async with Fake(pipelining=pipelining) as fake:
        fake.fail("DATACMD", "250 2.0.0 Ok", times=1)
        engine = _engine(fake)
        first = await engine.deliver(envelope(queue_id="Q1"), ["a@ok.test"])
        second = await engine.deliver(envelope(queue_id="Q2"), ["a@ok.test"])
        await engine.aclose()
        assert first["a@ok.test"].temporary and not fake.messages[:-1]
        assert second["a@ok.test"].delivered and fake.connections == 2
