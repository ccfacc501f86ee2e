"""A mail loop between two relays ends in one bounce (reliability.md 4.16).

Relay A sends loop.test to relay B and B sends it back to A. Each relay adds a Received
header, so after `--hop-limit` transfers the receiving relay refuses the message with
`554 5.4.6`; the relay that was refused bounces it once to the original sender (whose
domain home.test both route to a sink). The bounce itself comes from the null sender
and is never bounced again.
"""
from __future__ import annotations

import asyncio

import pytest

from tests.e2e.conftest import dsn_fields, message, rules_with_home, send
from tests.support.fake_smtp import FakeSmtp
from tests.support.relay import stable_port

pytestmark = pytest.mark.slow
HOPS = 6


def rules(peer_port: int, home: FakeSmtp) -> str:
    return rules_with_home(home, "loop.test", "peer", f"smtp://127.0.0.1:{peer_port}", timeout="10s")


async def test_a_loop_between_two_relays_ends_in_one_bounce(make_relay):
    async with FakeSmtp("127.0.0.6") as home:
        port_a, port_b = stable_port(), stable_port()
        flags = ["--hop-limit", str(HOPS)]
        a = make_relay(rules(port_b, home), name="a", listen=f"127.0.0.1:{port_a}", hostname="a.test", args=flags)
        b = make_relay(rules(port_a, home), name="b", listen=f"127.0.0.1:{port_b}", hostname="b.test", args=flags)
        async with a, b:
            await send(a, "me@home.test", ["x@loop.test"], message("me@home.test", ["x@loop.test"], msgid="<loop@t>"))
            (bounce,) = await home.wait_for(1, timeout=30)
            refused = await asyncio.wait_for(_refusal(a, b), 10)
            transfers = a.log.count("engine=peer") + b.log.count("engine=peer")
    assert bounce.sender == "" and bounce.recipients == ["me@home.test"]
    fields = dsn_fields(bounce.data)
    assert fields["status"] == "5.4.6" and "554 5.4.6" in fields["diagnostic-code"]
    assert refused
    assert transfers <= HOPS + 1
    assert len(home.messages) == 1          # one bounce, and the bounce was not looped


async def _refusal(a, b) -> bool:
    while "5.4.6" not in a.log + b.log:
        await asyncio.sleep(0.02)
    return True
