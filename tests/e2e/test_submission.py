"""Submission the way a mail client does it: STARTTLS or implicit TLS with the relay's own
certificate, and AUTH for a user added with `routedsl users add`, from an address outside
the relay networks. Exercises every TLS/AUTH flag of `routedsl serve` end to end.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys

import aiosmtplib
import pytest

from tests.e2e.conftest import message
from tests.support import certs
from tests.support.fake_smtp import FakeSmtp
from tests.support.relay import stable_port

pytestmark = pytest.mark.slow


def add_user(path, login: str, password: str) -> None:
    done = subprocess.run([sys.executable, "-m", "routedsl", "users", "add", str(path), login],
                          input=password + "\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("processes", ["0", "2"])   # SMTP in the relay's process, or in two of its own
async def test_authenticated_submission_over_starttls_and_implicit_tls(tmp_path, make_relay, processes):
    users = tmp_path / "users"
    await asyncio.to_thread(add_user, users, "alice", "correct horse")
    cert, key = certs.cert_files()
    tls_port = stable_port()
    async with FakeSmtp("127.0.0.3") as sink:
        relay = make_relay(
            f"engine sink = smtp://127.0.0.3:{sink.port} tls none\n",
            args=["--relay-network", "127.0.0.1/32", "--users", str(users), "--tls-cert", cert,
                  "--tls-key", key, "--listen-tls", f"127.0.0.1:{tls_port}", "--smtp-processes", processes])
        async with relay:
            host, port = relay.address
            data = message("alice@home.test", ["bob@example.net"], msgid="<starttls@t>")
            # 127.0.0.9 is outside the relay network: without AUTH it may not relay
            async with aiosmtplib.SMTP(hostname=host, port=port, source_address=("127.0.0.9", 0),
                                       start_tls=True, tls_context=certs.client_context()) as client:
                with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                    await client.sendmail("alice@home.test", ["bob@example.net"], data)
                with pytest.raises(aiosmtplib.SMTPAuthenticationError) as wrong:
                    await client.login("alice", "wrong password")
                await client.login("alice", "correct horse")
                errors, _ = await client.sendmail("alice@home.test", ["bob@example.net"], data)
            async with aiosmtplib.SMTP(hostname=host, port=tls_port, source_address=("127.0.0.9", 0),
                                       use_tls=True, tls_context=certs.client_context()) as client:
                await client.login("alice", "correct horse")
                await client.sendmail("alice@home.test", ["bob@example.net"],
                                      message("alice@home.test", ["bob@example.net"], msgid="<implicit@t>"))
            got = await sink.wait_for(2)
    assert refused.value.recipients[0].code == 554
    assert wrong.value.code == 535
    assert errors == {}
    assert sorted(m.header("Message-ID") for m in got) == ["<implicit@t>", "<starttls@t>"]
    first = got[0].data.split(b"\r\n\r\n")[0]
    assert b"with ESMTPSA" in first                      # TLS and AUTH, as Postfix writes it
    assert b"alice" not in first.split(b";")[0]          # the login is never written
    assert "correct horse" not in relay.log
