"""No open relay: only clients in the relay networks (default loopback) or authenticated
clients may name recipients; everyone else gets 554 5.7.1 at RCPT and nothing is queued."""
from __future__ import annotations

from tests.security.harness import Client, code

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n.\r\n"


async def send_one(client: Client, rcpt: bytes = b"<b@y.test>") -> list[str]:
    replies = [await client.cmd(b"EHLO client.test"), await client.cmd(b"MAIL FROM:<a@x.test>"),
               await client.cmd(b"RCPT TO:" + rcpt)]
    if code(replies[-1]).startswith("250"):
        replies.append(await client.cmd(b"DATA"))
        await client.send(MESSAGE)
        replies.append(await client.reply())
    return [code(r) for r in replies]


async def test_loopback_client_may_relay_by_default(relays):
    relay = await relays()
    client = await Client.connect(relay.port)
    assert await send_one(client) == ["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    await client.close()
    assert [m.recipients for m in relay.handler.messages] == [["b@y.test"]]


async def test_client_outside_the_relay_networks_gets_554_and_nothing_is_queued(relays):
    relay = await relays(relay_networks=("127.0.0.1/32",))
    client = await Client.connect(relay.port, src="127.0.0.50")
    for rcpt in (b"<b@y.test>", b"<u%outside.test@local.test>", b"<\"u@outside.test\"@local.test>",
                 b"<@local.test:u@outside.test>", b"<u@[127.0.0.2]>", b"<u@localhost>"):
        replies = await send_one(client, rcpt)
        assert replies[-1] == "554 5.7.1", rcpt
        assert code(await client.cmd(b"RSET")) == "250"
    assert code(await client.cmd(b"DATA")) == "503 5.5.1"
    await client.close()
    assert relay.handler.messages == []


async def test_relay_networks_replace_the_loopback_default(relays):
    relay = await relays(relay_networks=("127.0.0.50/32",))
    outsider = await Client.connect(relay.port, src="127.0.0.1")
    assert (await send_one(outsider))[-1] == "554 5.7.1"
    insider = await Client.connect(relay.port, src="127.0.0.50")
    assert (await send_one(insider))[-1] == "250 2.0.0"
    await outsider.close(), await insider.close()
    assert [m.peer for m in relay.handler.messages] == ["127.0.0.50"]


async def test_mixed_recipients_only_the_allowed_ones_are_queued(relays):
    """Denied recipients do not spoil the transaction for an authenticated... here: a trusted client
    whose other recipients are malformed; only well-formed accepted ones reach the handler."""
    relay = await relays()
    client = await Client.connect(relay.port)
    await client.cmd(b"EHLO c.test")
    await client.cmd(b"MAIL FROM:<a@x.test>")
    assert code(await client.cmd(b"RCPT TO:<ok@y.test>")) == "250 2.1.5"
    assert code(await client.cmd(b"RCPT TO:<u@outside.test@local.test>")) == "553 5.1.3"
    assert code(await client.cmd(b"RCPT TO:<ok@y.test>")) == "250 2.1.5"   # duplicate: delivered once
    assert code(await client.cmd(b"DATA")) == "354"
    await client.send(MESSAGE)
    assert code(await client.reply()) == "250 2.0.0"
    await client.close()
    assert [m.recipients for m in relay.handler.messages] == [["ok@y.test"]]
