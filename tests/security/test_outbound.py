"""The outbound side of the defences: the wait for the reply to the final dot is RFC 5321's
10 minutes, not the per-command timeout (a slow but successful next hop must not turn into
a retry and a duplicate), and reply texts from remote servers are cleaned of control
characters before they reach logs, bounces or `queue show`."""
from __future__ import annotations

import asyncio
import re

from aiosmtpd.smtp import SMTP

from routedsl.table import EngineSpec
from server.engines.base import EngineContext, Envelope, build_engine
from server.outcome import Kind

MESSAGE = b"Subject: slow\r\n\r\nbody\r\n"


class SlowHop:
    """A next hop that takes `delay` seconds to answer the final dot; `rcpt_reply` replaces RCPT's."""

    def __init__(self, delay: float = 0.0, rcpt_reply: str | None = None) -> None:
        self.delay, self.rcpt_reply = delay, rcpt_reply
        self.accepted = 0

    async def handle_RCPT(self, server, session, envelope, address, options):
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.delay)   # the behaviour under test: a slow final reply
        self.accepted += 1
        return "250 2.0.0 taken"


async def deliver(hop: SlowHop, ctx: EngineContext, timeout: float = 0.5):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(hop, hostname="hop.test", loop=loop), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spec = EngineSpec(name="hop", kind="smtp", host="127.0.0.1", port=port, tls="none", timeout=timeout)
    engine = build_engine(spec, None, ctx)
    try:
        return await engine.deliver(Envelope("Q1", "a@x.test", MESSAGE), ["b@y.test"])
    finally:
        await engine.aclose()
        server.close()
        await server.wait_closed()


def test_the_final_dot_timeout_is_ten_minutes_by_default():
    assert EngineContext(hostname="relay.test").final_timeout == 600.0


async def test_a_slow_final_reply_within_the_final_timeout_is_a_delivery_not_a_retry():
    hop = SlowHop(delay=1.5)
    outcomes = await deliver(hop, EngineContext(hostname="relay.test"), timeout=0.5)
    assert outcomes["b@y.test"].kind is Kind.DELIVERED and hop.accepted == 1


async def test_a_final_reply_later_than_the_final_timeout_is_temporary():
    hop = SlowHop(delay=1.5)
    outcomes = await deliver(hop, EngineContext(hostname="relay.test", final_timeout=0.3), timeout=5)
    assert outcomes["b@y.test"].kind is Kind.TEMPORARY


async def test_remote_reply_text_is_cleaned():
    hostile = "550-5.1.1 User unknown\r\n550-5.1.1 \x1b[31mX-Injected: evil\r\n550 5.1.1 bye\rX-Also: bare-cr"
    outcomes = await deliver(SlowHop(rcpt_reply=hostile), EngineContext(hostname="relay.test"))
    out = outcomes["b@y.test"]
    assert out.kind is Kind.PERMANENT and out.code == 550
    for text in (out.text, out.reply):
        assert not re.search(r"[\x00-\x1f\x7f]", text), text
