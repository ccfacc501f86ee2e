"""The aiosmtpd handler: what happens to a message once the client has sent it.

This module owns the hand-over from the SMTP conversation to the spool. It runs under
the hardened protocol of server/smtp.py (RelaySMTP), which has already refused a client
that may not relay (at RCPT, server/access.py) and applied the DATA policy of
server/hygiene.py (line ends, NUL, hop count, header size) before DATA reaches it:
  * DATA: a `Received:` header built only from sanitised values
    (hygiene.received_header), then `await spool.accept(...)`. `250 2.0.0 Ok: queued
    as ID` is answered only after accept() returns, that is after the message is
    fsynced (G1). Then the scheduler is woken for it.
  * A stop: `drain()` waits until every client already past its final dot is answered.
  * Failures are answered as temporary (G4): a write error `451 4.3.0`, a full disk or
    quota `452 4.3.1`, anything else `451 4.3.0` with the traceback in the log. Never a
    5xx for our own trouble and never exception text to the client.

It never speaks SMTP to the next hop and never decides routes: the scheduler does.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional, Protocol

from server import hygiene
from server.queue import DISK_FULL_ERRNOS

log = logging.getLogger("routedsl.intake")

OK_QUEUED = "250 2.0.0 Ok: queued as {id}"
WRITE_ERROR = "451 4.3.0 Error: queue file write error, try again later"
DISK_FULL = "452 4.3.1 Insufficient system storage, try again later"
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"



class Spool(Protocol):
    async def accept(self, sender: str, recipients: list[str], data: bytes, *, smtputf8: bool = False) -> Any: ...


def _protocol(session: Any, smtputf8: bool) -> str:
    proto = "UTF8SMTP" if smtputf8 else ("ESMTP" if getattr(session, "extended_smtp", True) else "SMTP")
    if getattr(session, "ssl", None):
        proto += "S"
    if getattr(session, "authenticated", False):
        proto += "A"
    return proto


def _tls_version(session: Any) -> Optional[str]:
    ssl_info = getattr(session, "ssl", None)
    ssl_object = ssl_info.get("ssl_object") if isinstance(ssl_info, dict) else None
    try:
        return ssl_object.version() if ssl_object is not None else None
    except Exception:
        return None


class Intake:
    """The aiosmtpd handler. `on_accepted(msg)` is called after each durable accept (scheduler.wake)."""

    def __init__(self, spool: Spool, *, hostname: str,
                 on_accepted: Callable[[Any], None] = lambda msg: None) -> None:
        self.spool = spool
        self.hostname = hostname
        self.on_accepted = on_accepted
        self._in_flight = 0
        self.accepted = 0      # answered 250 after DATA (for --metrics)
        self.refused = 0       # answered 4xx/5xx after DATA
        self._idle = asyncio.Event()
        self._idle.set()

    async def handle_DATA(self, server, session, envelope) -> str:
        self._in_flight += 1
        self._idle.clear()
        try:
            reply = await self._data(session, envelope)
        except Exception:
            log.exception("internal error while accepting a message; answered 451")
            reply = INTERNAL_ERROR
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        if reply.startswith("250"):
            self.accepted += 1
        else:
            self.refused += 1
        return reply

    async def drain(self, timeout: float) -> bool:
        """Wait until no message is being handed to the spool (a stop calls this after the
        listeners are closed, so every client already past the final dot gets its answer).
        Returns False if some were still in progress after `timeout`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _data(self, session, envelope) -> str:
        peer_ip = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        data = envelope.original_content or b""
        sender = "" if envelope.mail_from in (None, "", "<>") else envelope.mail_from
        recipients = list(envelope.rcpt_tos)
        smtputf8 = bool(getattr(envelope, "smtp_utf8", False))
        header = hygiene.received_header(
            helo=session.host_name, peer_ip=peer_ip, hostname=self.hostname,
            protocol=_protocol(session, smtputf8), tls=_tls_version(session),
            recipient=recipients[0] if len(recipients) == 1 else None)
        try:
            msg = await self.spool.accept(sender, recipients, header + data, smtputf8=smtputf8)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                log.error("spool full, answered 452: %s", exc)
                return DISK_FULL
            log.error("spool write failed, answered 451: %s", exc)
            return WRITE_ERROR
        qid = msg.id
        log.info("%s: accepted from %s sender=<%s> nrcpt=%d size=%d",
                 qid, peer_ip, sender, len(recipients), len(data) + len(header))
        try:
            self.on_accepted(msg)
        except Exception:
            # The message is durable; the scheduler's own scan will find it.
            log.exception("%s: could not wake the scheduler", qid)
        return OK_QUEUED.format(id=qid)

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error, answered 451", exc_info=error)
        return INTERNAL_ERROR
