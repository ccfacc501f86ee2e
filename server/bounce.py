"""Delivery status notifications (RFC 3464) and delay notices, built with the stdlib `email`.

Owns the text of what the sender gets back: a `multipart/report;
report-type=delivery-status` with a human part naming every engine tried and its last
reply, a `message/delivery-status` part (Reporting-MTA, Arrival-Date, and per recipient
Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code) and the original header
section (`text/rfc822-headers`). It never queues or sends anything itself: the scheduler
commits the returned bytes with `Spool.put(sender="", recipients=[original sender],
kind="bounce" | "delay")`, and decides *whether* to notify (`may_notify`): never the null
sender, never about a bounce or a notice (no bounce loops).

Remote reply texts arrive cleaned by server/outcome.py; they are cleaned again here with
server/text.py (control characters to spaces, bounded length) because a DSN is the one
place where a hostile server's words are copied into headers someone else reads.
"""
from __future__ import annotations

import email.policy
import re
import time
from dataclasses import dataclass
from email.charset import QP, Charset
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone
from typing import Literal, Optional, Sequence

from server.queue import QueuedMessage
from server.text import clean_text

Notice = Literal["failed", "delayed"]
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
MAX_TEXT = 900  # a DSN may quote a longer reply than a log line


def needs_smtputf8(msg: QueuedMessage) -> bool:
    """Whether the notice for msg's sender must be sent with SMTPUTF8."""
    return not msg.sender.isascii()


def may_notify(msg: QueuedMessage) -> bool:
    """Whether a bounce or delay notice may go to this message's sender."""
    return msg.sender != "" and msg.kind == "mail"


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """What the sender is told about one recipient."""
    address: str
    status: str                                   # enhanced status, e.g. "5.1.1", "4.4.7"
    diagnostic: Optional[str] = None              # the last reply, e.g. "550 5.1.1 no such user"
    remote: Optional[str] = None                  # the host that gave it, if any
    tried: tuple[tuple[str, str], ...] = ()       # (engine, its last reply), in the order tried


def enhanced_status(code: Optional[str], fallback: str) -> str:
    return code if code and _ENHANCED.match(code) else fallback


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, timezone.utc))


def _address_field(address: str) -> str:
    # RFC 6533: a non-ASCII address is reported with the utf-8 address type
    return f"{'rfc822' if address.isascii() else 'utf-8'}; {clean_text(address, 500)}"


def _diagnostic_field(reply: str) -> str:
    reply = clean_text(reply, MAX_TEXT)
    kind = "smtp" if re.match(r"^[245]\d\d\b", reply) else "X-routedsl"
    return f"{kind}; {reply}"


def _human_text(notice: Notice, hostname: str, msg: QueuedMessage,
                reports: Sequence[RecipientReport], now: float,
                retry_until: Optional[float]) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if notice == "failed":
        lines += ["Your message could not be delivered to one or more recipients.",
                  "It has been given up on; the details are below.", ""]
    else:
        hours = (now - msg.arrival) / 3600
        lines += [f"Your message has not been delivered yet after {hours:.1f} hours.",
                  "It is still being retried"
                  + (f" until {_date(retry_until)}." if retry_until else "."),
                  "You do not need to send it again.", ""]
    lines.append(f"Queue id: {msg.id}, received {_date(msg.arrival)}.")
    lines.append("")
    for r in reports:
        what = "failed" if notice == "failed" else "delayed"
        lines.append(f"<{clean_text(r.address, 500)}>: {what} ({r.status})")
        if not r.tried:
            lines.append("    no delivery engine was tried")
        for engine, reply in r.tried:
            lines.append(f"    engine {clean_text(engine, 100)}: {clean_text(reply, MAX_TEXT)}")
        lines.append("")
    return "\n".join(lines)


def build_notice(*, notice: Notice, msg: QueuedMessage, headers: bytes,
                 reports: Sequence[RecipientReport], hostname: str,
                 now: Optional[float] = None, retry_until: Optional[float] = None) -> bytes:
    """The whole notice message (headers and body, CRLF line ends) for `msg`'s sender.

    `headers` is the original header section (bytes before the first empty line).
    Raises ValueError if the sender may not be notified (see may_notify).
    """
    if not may_notify(msg):
        raise ValueError("never notify the null sender or about a notice")
    if not reports:
        raise ValueError("a notice needs at least one recipient report")
    now = time.time() if now is None else now
    # a non-ASCII sender is written as UTF-8 (RFC 6532), never as encoded words in an address;
    # such a notice must then travel with SMTPUTF8 (see needs_smtputf8)
    policy = email.policy.SMTP if msg.sender.isascii() else email.policy.SMTPUTF8

    cs = Charset("utf-8")
    cs.body_encoding = QP  # readable in any mail client's source view, unlike base64
    human = MIMEText(_human_text(notice, hostname, msg, reports, now, retry_until),
                     "plain", cs, policy=policy)
    human["Content-Description"] = "Notification"

    status = Message(policy=policy)
    status["Content-Type"] = "message/delivery-status"
    status["Content-Description"] = "Delivery report"
    per_message = Message(policy=policy)
    per_message["Reporting-MTA"] = f"dns; {clean_text(hostname, 255)}"
    per_message["X-Queue-ID"] = msg.id
    per_message["Arrival-Date"] = _date(msg.arrival)
    status.attach(per_message)
    for r in reports:
        block = Message(policy=policy)
        block["Final-Recipient"] = _address_field(r.address)
        block["Action"] = notice
        block["Status"] = r.status
        if r.remote:
            block["Remote-MTA"] = f"dns; {clean_text(r.remote, 255)}"
        if r.diagnostic:
            block["Diagnostic-Code"] = _diagnostic_field(r.diagnostic)
        block["Last-Attempt-Date"] = _date(now)
        if notice == "delayed" and retry_until:
            block["Will-Retry-Until"] = _date(retry_until)
        status.attach(block)

    original = MIMEText(headers.decode("utf-8", "replace"), "rfc822-headers", cs, policy=policy)
    original["Content-Description"] = "Undelivered message headers" if notice == "failed" \
        else "Delayed message headers"

    report = MIMEMultipart("report", report_type="delivery-status", policy=policy)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{clean_text(hostname, 255)}>"
    report["To"] = f"<{msg.sender}>"
    report["Subject"] = ("Undelivered Mail Returned to Sender" if notice == "failed"
                         else "Delayed Mail (still being retried)")
    report["Date"] = _date(now)
    report["Message-ID"] = make_msgid(idstring=msg.id, domain=clean_text(hostname, 255))
    report["Auto-Submitted"] = "auto-replied"
    for part in (human, status, original):
        report.attach(part)
    return report.as_bytes(policy=policy)
