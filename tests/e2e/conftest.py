"""Shared pieces of the end-to-end tests: a relay subprocess per test, messages, a client."""
from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path
from typing import Callable, Iterable, Optional

import aiosmtplib
import pytest

from tests.support import certs
from tests.support.fake_smtp import FakeSmtp
from tests.support.relay import RelayProcess


@pytest.fixture
def make_relay(tmp_path: Path) -> Callable[..., RelayProcess]:
    """make_relay(rules_text, name="", **RelayProcess options) -> a relay (not started) on its own spool."""
    made: list[RelayProcess] = []

    def make(rules: str, *, name: str = "", **options) -> RelayProcess:
        """`name` keeps the rules and spool of several relays in one test apart."""
        path = tmp_path / f"rules{name}" / "routes.rules"
        path.parent.mkdir(exist_ok=True)
        path.write_text(rules, encoding="utf-8")
        options.setdefault("ca_file", certs.ca_file())
        relay = RelayProcess(path, tmp_path / f"spool{name}", **options)
        made.append(relay)
        return relay

    yield make
    for relay in made:   # a safety net: tests stop their relays themselves
        relay.kill()


def rules_with_home(home: FakeSmtp, domain: str, engine: str, url: str, *, timeout: str) -> str:
    """Rules that send `domain` through `engine` (a smarthost at `url`) and mail for
    home.test, the senders' domain, to the `home` sink, so bounces and notices arrive there."""
    return (f"engine {engine} = {url} tls none timeout {timeout}\n"
            f"engine home = smtp://{home.host}:{home.port} tls none timeout {timeout}\n"
            "if destination is home.test then use only home\n"
            f"if destination is {domain} then use only {engine}\n")


def message(sender: str, to: Iterable[str], *, msgid: str, subject: str = "test",
            size: int = 0) -> bytes:
    """An RFC 5322 message with CRLF line ends; `size` pads the body to about that many bytes."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender or "MAILER-DAEMON@relay.test"
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Message-ID"] = msgid
    line = "x" * 76 + "\n"
    body = "hello\n" + line * max(0, size // len(line))
    msg.set_content(body)
    return msg.as_bytes()


async def send(relay: RelayProcess, sender: str, to: list[str], data: bytes) -> str:
    """Submit over SMTP; returns the relay's reply to DATA (raises on any refusal)."""
    assert relay.address is not None
    host, port = relay.address
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as client:
        errors, reply = await client.sendmail(sender, to, data)
    assert errors == {}, errors
    return reply


def parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.default)


def dsn_fields(data: bytes) -> dict[str, str]:
    """The per-recipient fields of a delivery status notification (first recipient)."""
    report = parse(data)
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    fields: dict[str, str] = {}
    for block in blocks[1:2]:
        for key, value in block.items():
            fields[key.lower()] = str(value)
    return fields


def human_part(data: bytes) -> str:
    report = parse(data)
    text = next(p for p in report.walk() if p.get_content_type() == "text/plain")
    return text.get_content()


def header(data: bytes, name: str) -> Optional[str]:
    return parse(data).get(name)
