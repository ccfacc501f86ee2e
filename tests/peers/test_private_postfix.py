"""The private-Postfix helper: starts, relays a message to an in-loop aiosmtpd sink, stops."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from email.message import EmailMessage

import aiosmtplib
import pytest
import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.postfix import PrivatePostfix, postfix_available

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(not postfix_available(), reason="needs Postfix and root"),
]


class Recorder:
    """aiosmtpd handler that keeps every envelope it is given."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 stored"


async def start_sink(recorder: Recorder) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SMTP(recorder, hostname="sink.test"), "127.0.0.1", 0
    )


async def wait_for(predicate, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "alice@origin.test"
    msg["To"] = "bob@far.test"
    msg["Subject"] = subject
    msg.set_content("hello through postfix\n")
    return msg


async def test_relays_one_message_to_the_sink_and_stops(tmp_path):
    recorder = Recorder()
    sink = await start_sink(recorder)
    sink_port = sink.sockets[0].getsockname()[1]
    pf = PrivatePostfix(next_hop=("127.0.0.1", sink_port))
    try:
        async with pf:
            master = pf.master_pid()
            assert master is not None and master in pf.pids()
            await aiosmtplib.send(
                message("peer-relay"), hostname=pf.host, port=pf.port, start_tls=False
            )
            await wait_for(lambda: recorder.envelopes)
            await wait_for(lambda: "status=sent" in pf.log_file.read_text())
            assert pf.queue_count() == 0
        env = recorder.envelopes[0]
        assert env.mail_from == "alice@origin.test"
        assert env.rcpt_tos == ["bob@far.test"]
        assert b"Subject: peer-relay" in env.original_content
        assert b"hello through postfix" in env.original_content
        assert pf.pids() == ()                       # every Postfix process is gone
        assert not pf.root.exists()                  # its scratch folder too
    finally:
        pf.stop()
        sink.close()
        await sink.wait_closed()


async def test_smarthost_with_required_starttls(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "postfix.test")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    os.chmod(key_file, 0o600)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    recorder = Recorder()
    sink = await start_sink(recorder)
    sink_port = sink.sockets[0].getsockname()[1]
    pf = PrivatePostfix(
        next_hop=("127.0.0.1", sink_port),
        tls_cert=cert_file, tls_key=key_file, require_tls=True,
    )
    try:
        async with pf:
            plain = aiosmtplib.SMTP(hostname=pf.host, port=pf.port, start_tls=False)
            await plain.connect()
            with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
                await plain.sendmail("a@origin.test", ["b@far.test"], b"Subject: x\r\n\r\nx\r\n")
            assert refused.value.code == 530                 # must issue STARTTLS first
            await plain.quit()

            await aiosmtplib.send(
                message("over-tls"), hostname=pf.host, port=pf.port,
                start_tls=True, tls_context=client_ctx,
            )
            await wait_for(lambda: recorder.envelopes)
        assert b"Subject: over-tls" in recorder.envelopes[0].original_content
    finally:
        pf.stop()
        sink.close()
        await sink.wait_closed()


async def test_receive_only_instance_keeps_mail_on_hold():
    pf = PrivatePostfix()
    try:
        async with pf:
            await aiosmtplib.send(
                message("held"), hostname=pf.host, port=pf.port, start_tls=False
            )
            await wait_for(lambda: pf.queue_counts()["hold"] == 1)
            assert pf.queue_count() == 1                 # kept, and nothing sent on
        assert not pf.root.exists()
    finally:
        pf.stop()
