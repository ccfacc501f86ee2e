"""Builders shared by the engine tests: specs, contexts and envelopes."""
from __future__ import annotations

from email.message import EmailMessage
from typing import Any

from routedsl.table import EngineSpec
from server.engines.base import EngineContext, Envelope


def smarthost_spec(name: str = "isp", *, port: int, host: str = "127.0.0.1",
                   kind: str = "smtp", **options: Any) -> EngineSpec:
    options.setdefault("tls", "implicit" if kind == "smtps" else
                       ("required" if options.get("user") else "opportunistic"))
    options.setdefault("timeout", 5.0)
    return EngineSpec(name=name, kind=kind, host=host, port=port, **options)  # type: ignore[arg-type]


def direct_spec(name: str = "direct", *, port: int, **options: Any) -> EngineSpec:
    options.setdefault("timeout", 5.0)
    return EngineSpec(name=name, kind="direct", host=None, port=port, **options)


def context(*nameservers: str, ca_file: str | None = None, **options: Any) -> EngineContext:
    options.setdefault("dns_timeout", 2.0)
    options.setdefault("final_timeout", 10.0)
    return EngineContext(hostname="relay.test", nameservers=tuple(nameservers),
                         ca_file=ca_file, **options)


def envelope(sender: str = "alice@home.test", to: str = "bob@ok.test", *, size: int = 0,
             subject: str = "hello", queue_id: str = "Q1") -> Envelope:
    msg = EmailMessage()
    msg["From"] = sender or "MAILER-DAEMON@relay.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{queue_id}@relay.test>"
    msg.set_content("hello\n" + "x" * max(0, size - 200))
    return Envelope(queue_id=queue_id, sender=sender, data=msg.as_bytes())
