"""Interop with real peers from Debian: swaks submits to the relay, and the relay hands mail
to a private Postfix instance (its own config and queue, on a loopback port) as its
smarthost, which forwards it to a recording sink. CI installs both (.ci/run).
"""
from __future__ import annotations

import asyncio
import shutil

import pytest

from tests.support import certs
from tests.support.fake_smtp import FakeSmtp
from tests.support.postfix import PrivatePostfix

pytestmark = [pytest.mark.peer, pytest.mark.slow]


async def swaks(*args: str) -> tuple[int, str]:
    exe = shutil.which("swaks")
    assert exe, "swaks is not installed (apt-get install swaks; .ci/run does)"
    proc = await asyncio.create_subprocess_exec(
        exe, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode("utf-8", "replace")


async def test_swaks_submits_to_the_relay(make_relay):
    async with FakeSmtp("127.0.0.3") as sink:
        relay = make_relay(f"engine sink = smtp://127.0.0.3:{sink.port} tls none\n")
        async with relay:
            host, port = relay.address
            code, transcript = await swaks(
                "--server", host, "--port", str(port), "--ehlo", "client.test",
                "--from", "alice@home.test", "--to", "bob@example.net,carol@example.net",
                "--header", "Message-Id: <swaks-1@home.test>", "--header", "Subject: from swaks",
                "--body", "hello from swaks", "--pipeline")
            assert code == 0, transcript
            (got,) = await sink.wait_for(1)
    assert "250 2.0.0 Ok: queued as" in transcript
    assert got.header("Message-ID") == "<swaks-1@home.test>"
    assert sorted(got.recipients) == ["bob@example.net", "carol@example.net"]
    assert b"from client.test" in got.data.split(b"\r\n\r\n")[0]


async def test_swaks_from_outside_the_relay_network_is_refused(make_relay):
    async with FakeSmtp("127.0.0.3") as sink:
        relay = make_relay(f"engine sink = smtp://127.0.0.3:{sink.port} tls none\n",
                           args=["--relay-network", "127.0.0.1/32"])
        async with relay:
            host, port = relay.address
            code, transcript = await swaks(
                "--server", host, "--port", str(port), "--local-interface", "127.0.0.9",
                "--from", "spammer@elsewhere.test", "--to", "victim@example.net")
    assert code != 0
    assert "554 5.7.1" in transcript
    assert sink.messages == [] and sink.connections == 0


async def test_the_relay_delivers_through_postfix_as_its_smarthost(make_relay):
    cert, key = certs.cert_files()
    async with FakeSmtp("127.0.0.3") as sink:
        async with PrivatePostfix(next_hop=("127.0.0.3", sink.port), tls_cert=cert, tls_key=key) as postfix:
            relay = make_relay(
                f"engine postfix = smtp://127.0.0.1:{postfix.port} tls required\n")
            async with relay:
                host, port = relay.address
                code, transcript = await swaks(
                    "--server", host, "--port", str(port),
                    "--from", "alice@home.test", "--to", "bob@example.net",
                    "--header", "Message-Id: <via-postfix@home.test>", "--body", "through postfix")
                assert code == 0, transcript
                (got,) = await sink.wait_for(1, timeout=30)
                log = (await relay.await_log(r".*engine=postfix .*result=delivered.*")).group(0)
    assert got.header("Message-ID") == "<via-postfix@home.test>"
    assert got.recipients == ["bob@example.net"]
    received = [line for line in got.data.split(b"\r\n\r\n")[0].split(b"\r\n") if line.startswith(b"Received:")]
    assert len(received) >= 2                 # Postfix's, then ours
    assert b"(routedsl)" in got.data
    assert "engine=postfix" in log and "result=delivered" in log
