"""The intake handler behind the relay's own listener on loopback: what a client is answered.

The spool here is a small stand-in with the same `accept` coroutine as server.queue.Spool,
so each failure the real disk can produce (full, write error, a bug) can be provoked on
demand; the SMTP side is the relay's RelaySMTP, started by `start_listeners` as the app
starts it, and a real client.
"""
from __future__ import annotations

import asyncio
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP

from server.intake import Intake
from server.smtp import start_listeners


@dataclass
class Stored:
    id: str
    sender: str
    recipients: list
    data: bytes


class DiskSpool:
    """Writes each message to a file and fsyncs it before returning, like the real spool."""

    def __init__(self, root: Path, fail: Exception | None = None) -> None:
        self.root, self.fail, self.stored = root, fail, []

    async def accept(self, sender, recipients, data, *, smtputf8=False):
        if self.fail is not None:
            raise self.fail
        qid = f"Q{len(self.stored) + 1:04d}"
        path = self.root / qid

        def write():
            with open(path, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        await asyncio.to_thread(write)
        msg = Stored(qid, sender, list(recipients), data)
        self.stored.append(msg)
        return msg


async def serve(handler, relay_networks=()):
    """The handler behind the relay's listener (relay networks default to loopback)."""
    config = SimpleNamespace(listen=("127.0.0.1", 0), hostname="relay.test", max_size=10_000_000,
                             relay_networks=tuple(relay_networks))
    server, = await start_listeners(handler, config)
    return server, server.sockets[0].getsockname()[1]


async def send(port, sender, recipients, data: bytes, source="127.0.0.1"):
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, source_address=(source, 0),
                             start_tls=False, timeout=10)
    async with client:
        return await client.sendmail(sender, recipients, data)


MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n"


async def test_250_names_the_queue_id_and_the_file_is_on_disk(tmp_path):
    spool = DiskSpool(tmp_path)
    woken = []
    server, port = await serve(Intake(spool, hostname="relay.test", on_accepted=woken.append))
    try:
        errors, reply = await send(port, "a@example.org", ["b@example.net"], MESSAGE)
    finally:
        server.close()
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as Q0001")
    assert woken == spool.stored
    stored = (tmp_path / "Q0001").read_bytes()
    assert stored.startswith(b"Received: from ")
    assert stored.endswith(MESSAGE)
    assert spool.stored[0].sender == "a@example.org"


async def test_null_sender_is_stored_as_empty(tmp_path):
    spool = DiskSpool(tmp_path)
    server, port = await serve(Intake(spool, hostname="relay.test"))
    try:
        await send(port, "", ["b@example.net"], MESSAGE)
    finally:
        server.close()
    assert spool.stored[0].sender == ""


@pytest.mark.parametrize("error, reply", [
    (OSError(errno.ENOSPC, "No space left on device"), (452, "4.3.1")),
    (OSError(errno.EIO, "Input/output error"), (451, "4.3.0")),
    (RuntimeError("secret internal detail"), (451, "4.3.0")),
])
async def test_spool_failures_are_temporary_and_reveal_nothing(tmp_path, error, reply):
    server, port = await serve(Intake(DiskSpool(tmp_path, fail=error), hostname="relay.test"))
    try:
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send(port, "a@example.org", ["b@example.net"], MESSAGE)
    finally:
        server.close()
    assert caught.value.code == reply[0]
    assert caught.value.message.startswith(reply[1])
    assert "secret" not in caught.value.message and "Errno" not in caught.value.message


async def test_relay_refused_outside_the_relay_networks(tmp_path):
    spool = DiskSpool(tmp_path)
    server, port = await serve(Intake(spool, hostname="relay.test"), relay_networks=["127.0.0.1/32"])
    try:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as caught:
            await send(port, "a@example.org", ["b@example.net"], MESSAGE, source="127.0.0.2")
        errors, _ = await send(port, "a@example.org", ["b@example.net"], MESSAGE, source="127.0.0.1")
    finally:
        server.close()
    assert caught.value.recipients[0].code == 554
    assert caught.value.recipients[0].message.startswith("5.7.1")
    assert errors == {} and len(spool.stored) == 1


async def test_more_than_50_hops_is_refused_as_a_loop(tmp_path):
    spool = DiskSpool(tmp_path)
    looped = b"".join(b"Received: from x by y; Sun, 1 Jan 2026 00:00:00 +0000\r\n" for _ in range(51)) + MESSAGE
    server, port = await serve(Intake(spool, hostname="relay.test"))
    try:
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send(port, "a@example.org", ["b@example.net"], looped)
        errors, _ = await send(port, "a@example.org", ["b@example.net"], looped.split(b"\r\n", 1)[1])
    finally:
        server.close()
    assert (caught.value.code, caught.value.message[:5]) == (554, "5.4.6")
    assert errors == {} and len(spool.stored) == 1   # 50 hops still pass


async def test_received_header_carries_no_client_controlled_line_breaks(tmp_path):
    # RelaySMTP refuses this EHLO outright (tests/security/test_input_hygiene.py). Here the
    # header the intake writes is tried on its own, so the handler runs under aiosmtpd's
    # plain SMTP, which passes the name through.
    spool = DiskSpool(tmp_path)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Intake(spool, hostname="relay.test"), hostname="relay.test"), host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        for line in (b"EHLO evil\rX-Injected: yes\r\n", b"MAIL FROM:<a@example.org>\r\n",
                     b"RCPT TO:<b@example.net>\r\n", b"DATA\r\n"):
            writer.write(line)
            await writer.drain()
            while (reply := await reader.readline())[3:4] == b"-":
                pass
        writer.write(MESSAGE + b".\r\n")
        await writer.drain()
        reply = await reader.readline()
        writer.write(b"QUIT\r\n")
        writer.close()
    finally:
        server.close()
    assert reply.startswith(b"250 ")
    stored = spool.stored[0].data
    headers = stored.split(b"\r\n\r\n", 1)[0]
    assert not any(line.startswith(b"X-Injected") for line in headers.split(b"\r\n"))
    assert b"\r" not in headers.replace(b"\r\n", b"")


async def test_drain_waits_for_a_message_being_handed_to_the_spool(tmp_path):
    gate = asyncio.Event()

    class SlowSpool(DiskSpool):
        async def accept(self, *args, **kwargs):
            await gate.wait()
            return await super().accept(*args, **kwargs)

    spool = SlowSpool(tmp_path)
    intake = Intake(spool, hostname="relay.test")
    server, port = await serve(intake)
    try:
        assert await intake.drain(0.1)                       # nothing in progress
        sending = asyncio.create_task(send(port, "a@example.org", ["b@example.net"], MESSAGE))
        deadline = asyncio.get_running_loop().time() + 10
        while intake._in_flight == 0:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        server.close()                                       # a stop: no new connections
        assert not await intake.drain(0.2)                   # the client past its dot is still waiting
        gate.set()
        assert await intake.drain(5)
        errors, reply = await sending
    finally:
        server.close()
    assert reply.startswith("2.0.0 Ok: queued as")
