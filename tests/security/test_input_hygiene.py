"""Input hygiene over the wire: EHLO names, envelope paths and parameters with the bytes a
careless or hostile client sends (raw sockets: smtplib would clean them up first)."""
from __future__ import annotations

import pytest

from tests.security.harness import Client, code

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n.\r\n"


@pytest.fixture
async def client(relays):
    relay = await relays()
    client = await Client.connect(relay.port)
    client.relay = relay
    yield client
    await client.close()


@pytest.mark.parametrize("name", [b"a\rX-Injected: yes", b"a\x00b", b"\x1b[2J", b"a b", b"a\x7f", b"x" * 256])
async def test_bad_ehlo_names_get_501_and_no_session(client, name):
    assert code(await client.cmd(b"EHLO " + name)) == "501 5.5.2"
    assert code(await client.cmd(b"HELO " + name)) == "501 5.5.2"
    # Still no greeting accepted: a transaction cannot start.
    assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "503 5.5.1"


async def test_empty_ehlo_gets_501(client):
    assert code(await client.cmd(b"EHLO")) == "501 5.5.4"
    assert code(await client.cmd(b"EHLO ")) == "501 5.5.4"


async def test_commands_before_ehlo_get_503_5_5_1(client):
    for line in (b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@y.test>", b"DATA", b"AUTH PLAIN"):
        assert code(await client.cmd(line)) == "503 5.5.1", line


async def test_ehlo_advertises_size_pipelining_smtputf8_and_no_auth_without_tls(client):
    reply = await client.cmd(b"EHLO c.test")
    assert b"250-SIZE 35000000" in reply and b"PIPELINING" in reply and b"SMTPUTF8" in reply
    assert b"AUTH" not in reply and b"STARTTLS" not in reply


@pytest.mark.parametrize("path, expected", [
    (b"<a\x00b@x.test>", "501 5.1.7"),
    (b"<a\x7f@x.test>", "501 5.1.7"),
    (b"<a\tb@x.test>", "501 5.1.7"),
    (b"<a\rb@x.test>", "501 5.1.7"),
    (b"<j\xff\xfe@x.test>", "501 5.1.7"),          # not UTF-8
    (b"<j\xc3\xb6rg@x.test>", "553 5.6.7"),        # unicode without SMTPUTF8
    (b"a@x.test", "501 5.5.4"),                    # no brackets (RFC 5321 4.1.2)
    (b"<a@x.test", "501 5.5.4"),
    (b"<a@x.test>junk", "501 5.5.4"),
    (b"<a@@x.test>", "553 5.1.7"),
    (b"<a@x.test@y.test>", "553 5.1.7"),
    (b"<a@-x.test>", "553 5.1.7"),
    (b"<" + b"l" * 65 + b"@x.test>", "501 5.1.7"),
    (b"<a@x.test> FOO=bar", "555 5.5.4"),
    (b"<a@x.test> SIZE=35000001", "552 5.3.4"),
    (b"<a@x.test> SIZE=abc", "501 5.5.4"),
    (b"<a@x.test> BODY=BINARYMIME", "501 5.5.4"),
])
async def test_bad_senders_are_refused_with_the_exact_reply(client, path, expected):
    await client.cmd(b"EHLO c.test")
    assert code(await client.cmd(b"MAIL FROM:" + path)) == expected
    # The refusal leaves no sender behind: a good MAIL works at once.
    assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "250 2.1.0"


@pytest.mark.parametrize("path, expected", [
    (b"<>", "501 5.1.3"),
    (b"<b\x00@y.test>", "501 5.1.3"),
    (b"<b\x1b@y.test>", "501 5.1.3"),
    (b"<b\xed\xa0\x80@y.test>", "501 5.1.3"),        # an encoded surrogate: not UTF-8
    (b"<j\xc3\xb6rg@y.test>", "553 5.6.7"),
    (b"b@y.test", "501 5.5.4"),
    (b"Postmaster", "501 5.5.4"),
    (b"<u@outside.test@local.test>", "553 5.1.3"),
    (b"<b@y.test> NOTIFY=NEVER", "555 5.5.4"),
    (b"<" + b"l" * 60 + b"@" + b"d" * 60 + b"." + b"e" * 60 + b"." + b"f" * 60 + b"." + b"g" * 60 + b".test>",
     "501 5.1.3"),
])
async def test_bad_recipients_are_refused_and_never_queued(client, path, expected):
    await client.cmd(b"EHLO c.test")
    await client.cmd(b"MAIL FROM:<a@x.test>")
    assert code(await client.cmd(b"RCPT TO:" + path)) == expected
    assert code(await client.cmd(b"DATA")) == "503 5.5.1"
    assert client.relay.handler.messages == []


async def test_unicode_addresses_with_smtputf8_are_accepted(client):
    await client.cmd(b"EHLO c.test")
    assert code(await client.cmd("MAIL FROM:<jörg@x.test> SMTPUTF8".encode())) == "250 2.1.0"
    assert code(await client.cmd("RCPT TO:<björn@bücher.test>".encode())) == "250 2.1.5"
    assert code(await client.cmd(b"DATA")) == "354"
    await client.send(MESSAGE)
    assert code(await client.reply()) == "250 2.0.0"
    (msg,) = client.relay.handler.messages
    assert (msg.sender, msg.recipients) == ("jörg@x.test", ["björn@bücher.test"])


async def test_null_sender_and_source_routes(client):
    await client.cmd(b"EHLO c.test")
    assert code(await client.cmd(b"MAIL FROM:<>")) == "250 2.1.0"
    assert code(await client.cmd(b"RCPT TO:<@hop.test:b@y.test>")) == "250 2.1.5"
    assert code(await client.cmd(b"DATA")) == "354"
    await client.send(MESSAGE)
    assert code(await client.reply()) == "250 2.0.0"
    (msg,) = client.relay.handler.messages
    assert (msg.sender, msg.recipients) == ("<>", ["b@y.test"])


async def test_nested_mail_and_rset(client):
    await client.cmd(b"EHLO c.test")
    await client.cmd(b"MAIL FROM:<a@x.test>")
    assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "503 5.5.1"
    assert code(await client.cmd(b"RSET")) == "250"
    assert code(await client.cmd(b"RCPT TO:<b@y.test>")) == "503 5.5.1"


async def test_http_request_on_the_smtp_port_is_answered_and_closed(client):
    assert code(await client.cmd(b"GET / HTTP/1.1")) == "502 5.7.0"
    assert await client.closed()


async def test_vrfy_and_expn_disclose_nothing(client):
    await client.cmd(b"EHLO c.test")
    assert code(await client.cmd(b"VRFY root")) == "252 2.5.0"
    assert code(await client.cmd(b"VRFY <a\rb@x.test>")) == "252 2.5.0"
    assert code(await client.cmd(b"EXPN staff")) == "502 5.5.1"
