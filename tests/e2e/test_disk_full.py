"""A full disk is a temporary problem (G4, reliability.md 4.13): the client is told to try
again later (4xx, never 5xx), nothing half-written is left live, and once space is back
the next message is accepted and delivered. The spool lives on a small tmpfs.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import aiosmtplib
import pytest

from tests.e2e.conftest import message, send
from tests.support.fake_smtp import FakeSmtp

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


async def send_without_size(address, sender: str, rcpt: str, data: bytes) -> bytes:
    """A plain SMTP client that declares no SIZE; returns the reply to the final dot."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        async def reply() -> bytes:
            while (line := await asyncio.wait_for(reader.readline(), 30))[3:4] == b"-":
                pass
            return line

        await reply()
        for command in (b"EHLO client.test", f"MAIL FROM:<{sender}>".encode(),
                        f"RCPT TO:<{rcpt}>".encode(), b"DATA"):
            writer.write(command + b"\r\n")
            answer = await reply()
            assert answer[:1] in (b"2", b"3"), (command, answer)
        writer.write(data + b".\r\n")
        await writer.drain()
        return (await reply()).rstrip()
    finally:
        writer.close()


def fill(disk: Path, leave: int) -> Path:
    """Fill the disk so that about `leave` bytes stay free."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as fh:
        fh.truncate(0)
        chunk = b"\0" * 65536
        remaining = max(0, free - leave)
        while remaining > 0:
            fh.write(chunk[: min(len(chunk), remaining)])
            remaining -= len(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return filler


async def test_a_full_disk_answers_4xx_and_recovers(small_disk, make_relay):
    spool = small_disk / "spool"
    async with FakeSmtp("127.0.0.3") as sink:
        relay = make_relay(f"engine sink = smtp://127.0.0.3:{sink.port} tls none\n",
                           args=["--spool", str(spool), "--max-size", "1mb", "--disk-reserve", "1kb"])
        async with relay:
            filler = fill(small_disk, leave=200_000)
            big = message("a@home.test", ["b@example.net"], msgid="<full@t>", size=600_000)
            # no SIZE declared at MAIL (which would be refused at once): the write itself fails
            reply = await send_without_size(relay.address, "a@home.test", "b@example.net", big)
            assert reply[:1] == b"4" and reply[4:9] in (b"4.3.0", b"4.3.1"), reply
            assert not any((spool / "msg").iterdir())          # nothing half-written went live
            assert not any((spool / "tmp").iterdir())
            filler.unlink()
            await send(relay, "a@home.test", ["b@example.net"], big)
            (got,) = await sink.wait_for(1)
    assert got.header("Message-ID") == "<full@t>"
    assert "Traceback" not in relay.log


async def test_mail_is_refused_at_mail_from_below_the_disk_reserve(small_disk, make_relay):
    spool = small_disk / "spool"
    async with FakeSmtp("127.0.0.3") as sink:
        relay = make_relay(f"engine sink = smtp://127.0.0.3:{sink.port} tls none\n",
                           args=["--spool", str(spool), "--max-size", "1mb"])   # reserve 1.5 MB
        async with relay:
            filler = fill(small_disk, leave=500_000)
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
                await send(relay, "a@home.test", ["b@example.net"],
                           message("a@home.test", ["b@example.net"], msgid="<reserve@t>"))
            filler.unlink()
    assert caught.value.code == 452 and caught.value.message.startswith("4.3.1")
    assert sink.messages == []
