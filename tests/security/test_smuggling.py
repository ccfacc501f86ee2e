"""SMTP smuggling (CVE-2023-51764 family): only <CRLF>.<CRLF> ends DATA, and what the relay
stores and sends has CRLF line ends only and no NUL, so that even a lenient downstream
(one that also ends data at a bare-LF or bare-CR dot) sees exactly one message per
accepted message and never one for a smuggled recipient."""
from __future__ import annotations

import re

import pytest

from tests.security.harness import Client, code, until
from tests.security.lenient import LenientServer

BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
VARIANTS = [b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\n.\n", b"\n.\r", b"\r.\n", b"\r.\r\n",
            b"\r\n.\r\r\n", b"\r\r\n.\r\r\n"]


def smuggling_body(eod: bytes, marker: bytes) -> bytes:
    return (b"Subject: outer\r\n\r\nbefore" + eod +
            b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<smuggled@y.test>\r\nDATA\r\n"
            b"Subject: SMUGGLED\r\n\r\nevil " + marker + b"\r\n.\r\n")


async def smuggle(client: Client, eod: bytes, marker: bytes) -> bytes:
    assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "250 2.1.0"
    assert code(await client.cmd(b"RCPT TO:<victim@y.test>")) == "250 2.1.5"
    assert code(await client.cmd(b"DATA")) == "354"
    await client.send(smuggling_body(eod, marker))
    return await client.reply()


@pytest.mark.parametrize("eod", VARIANTS)
async def test_protocol_hands_over_one_clean_message(relays, eod):
    relay = await relays()
    client = await Client.connect(relay.port)
    await client.cmd(b"EHLO c.test")
    assert code(await smuggle(client, eod, b"END")) == "250 2.0.0"
    assert code(await client.cmd(b"NOOP")) == "250"   # no smuggled command was answered
    await client.close()
    (msg,) = relay.handler.messages
    assert (msg.sender, msg.recipients) == ("a@x.test", ["victim@y.test"])
    assert b"SMUGGLED" in msg.data and b"END" in msg.data
    assert not BARE.search(msg.data)


async def test_nul_dot_is_refused_and_nothing_queued(relays):
    relay = await relays()
    client = await Client.connect(relay.port)
    await client.cmd(b"EHLO c.test")
    assert code(await smuggle(client, b"\r\n\x00.\r\n", b"END")) == "550 5.6.0"
    assert code(await client.cmd(b"NOOP")) == "250"
    await client.close()
    assert relay.handler.messages == []


async def test_smuggling_through_the_whole_relay_to_a_lenient_downstream(tmp_path):
    routedsl = pytest.importorskip("routedsl")
    if not hasattr(routedsl, "compile_text"):
        pytest.skip("the routes language is not built yet")
    from tests.support.relay import RelayProcess

    downstream = await LenientServer().start()
    rules = tmp_path / "routes.rules"
    rules.write_text(f"engine down = smtp://127.0.0.1:{downstream.port} tls none\n")
    relay = RelayProcess(rules, tmp_path / "spool")
    try:
        await relay.astart()
        client = await Client.connect(relay.address[1])
        await client.cmd(b"EHLO c.test")
        accepted = []
        for n, eod in enumerate(VARIANTS + [b"\r\n\x00.\r\n"]):
            marker = b"END-%d" % n
            reply = await smuggle(client, eod, marker)
            assert code(reply) in ("250 2.0.0", "550 5.6.0"), (eod, reply)
            if code(reply).startswith("250"):
                accepted.append(marker)
        await client.cmd(b"QUIT")
        await client.close()
        assert len(accepted) == len(VARIANTS)
        # Every accepted message's last bytes have reached the downstream ...
        await until(lambda: all(any(m in msg.data for msg in downstream.messages) for m in accepted),
                    timeout=30, what="every accepted message at the downstream")
        # ... as exactly one message each, never to the smuggled recipient or from the smuggled sender.
        assert len(downstream.messages) == len(accepted)
        for msg in downstream.messages:
            assert msg.recipients == ["<victim@y.test>"] and msg.sender.split()[0] == "<a@x.test>"
            assert b"SMUGGLED" in msg.data
        wire = b"".join(downstream.wire)
        assert b"\x00" not in wire and not BARE.search(wire)
    finally:
        await relay.astop()
        await downstream.stop()
