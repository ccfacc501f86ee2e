"""Delivery outcomes and the one failure policy of the relay.

This module owns the decision every delivery attempt ends in: delivered, temporary or
permanent, and whether a failure is a *destination verdict* (final: no other MX host and
no other engine is tried) or an *engine fault* (try the next host, then the next engine).
Every aiosmtplib exception, SMTP reply, DNS error and TLS failure is turned into an
`Outcome` here and nowhere else (spec §7):

* a 5xx reply with enhanced status 5.1.x (at RCPT or after DATA), a null MX or a
  domain that does not exist: permanent and final;
* any 4xx, connection, timeout, TLS, DNS, AUTH failure: temporary engine fault;
* relaying denied, message too large, any other 5xx: permanent but not final.

Reply texts come from remote servers and are attacker-controlled: they are cleaned by
server/text.py (no control characters, no escape sequences, no bare CR/LF, bounded
length) before an Outcome carries them anywhere (logs, queue state, bounces).

It never opens a socket, never logs a delivery and never raises.
"""
from __future__ import annotations

import enum
import logging
import re
import ssl
import sys
from dataclasses import dataclass
from typing import Optional

import aiosmtplib

from server.text import MAX_TEXT, clean_text  # MAX_TEXT: the bound of every Outcome.text

log = logging.getLogger("routedsl.outcome")


# The connection went away: what aiosmtplib and the socket layer raise for it.
DISCONNECTED = (aiosmtplib.SMTPServerDisconnected, ConnectionError, EOFError)

# RFC 3463: class.subject.detail, the class must agree with the reply code's first digit.
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


class Kind(enum.Enum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


class Stage(str, enum.Enum):
    """Where in the SMTP dialogue a reply or failure happened."""
    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    TLS = "tls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    DNS = "dns"
    LOCAL = "local"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one delivery attempt for one recipient through one engine.

    `final` marks a destination verdict: no other MX host and no other engine is tried.
    `text` is already cleaned; `reply` is the canonical one-line form for logs and DSNs.
    """
    kind: Kind
    code: Optional[int]
    enhanced: Optional[str]
    text: str
    engine: str
    host: Optional[str]
    final: bool = False

    @property
    def reply(self) -> str:
        parts = [str(self.code)] if self.code is not None else []
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)

    @property
    def delivered(self) -> bool:
        return self.kind is Kind.DELIVERED

    @property
    def temporary(self) -> bool:
        return self.kind is Kind.TEMPORARY

    @property
    def permanent(self) -> bool:
        return self.kind is Kind.PERMANENT


def split_enhanced(code: Optional[int], message: str) -> tuple[Optional[str], str]:
    """Split an SMTP reply text into (enhanced status code, cleaned text).

    A multi-line reply repeats the enhanced code on each line; it is removed from every
    line so the text reads once. An enhanced code whose class disagrees with the reply
    code is not trusted (RFC 3463 §2).
    """
    enhanced: Optional[str] = None
    lines = []
    for line in str(message).replace("\r\n", "\n").split("\n"):
        stripped = line.strip()
        m = _ENHANCED.match(stripped)
        if m:
            if enhanced is None and (code is None or str(code)[0] == m.group(1)):
                enhanced = f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"
            stripped = stripped[m.end():].lstrip()
        lines.append(stripped)
    return enhanced, clean_text(" ".join(lines))


def _kind_of(code: int) -> Kind:
    if 200 <= code < 300:
        return Kind.DELIVERED
    if 500 <= code < 600:
        return Kind.PERMANENT
    # 4xx, and anything a server should not have said (1xx, 3xx, garbage) is transient
    return Kind.TEMPORARY


def from_reply(code: int, message: str, *, engine: str, host: Optional[str],
               stage: Stage) -> Outcome:
    """Turn one SMTP reply into an Outcome, applying the spec §7 policy."""
    if not 200 <= code < 600:
        # garbage instead of a reply (aiosmtplib reports it as code -1): the peer is broken
        return Outcome(Kind.TEMPORARY, None, "4.5.0",
                       "malformed reply from server: " + clean_text(message, 200), engine, host)
    enhanced, text = split_enhanced(code, message)
    kind = _kind_of(code)
    final = False
    if kind is Kind.PERMANENT:
        # Only a verdict about the recipient address itself is final; a 5.1.x answer to
        # MAIL FROM (bad sender) or to EHLO is about us or the engine, not the destination.
        final = (enhanced is not None and enhanced.startswith("5.1.")
                 and stage in (Stage.RCPT, Stage.DATA))
    elif kind is Kind.DELIVERED and stage not in (Stage.DATA, Stage.LOCAL):
        # A 2xx where a failure was reported (e.g. an odd code at RCPT) is not a delivery
        kind = Kind.TEMPORARY
    if stage is Stage.AUTH and kind is Kind.PERMANENT:
        # Refused credentials are the engine's problem (configuration), never the
        # message's: keep the mail and retry, as Postfix does by default.
        kind = Kind.TEMPORARY
    return Outcome(kind, code, enhanced, text, engine, host, final)


def delivered(message: str, *, engine: str, host: Optional[str], code: int = 250) -> Outcome:
    return from_reply(code, message, engine=engine, host=host, stage=Stage.DATA)


def _ssl_error_in(exc: BaseException) -> Optional[BaseException]:
    seen = 0
    cur: Optional[BaseException] = exc
    while cur is not None and seen < 8:
        if isinstance(cur, (ssl.SSLError, ssl.CertificateError)):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def classify(problem: BaseException, *, engine: str, host: Optional[str],
             stage: Stage) -> Outcome:
    """Turn an exception raised while delivering into an Outcome. Never raises."""
    try:
        return _classify(problem, engine=engine, host=host, stage=stage)
    except Exception:  # the policy itself must never take a delivery down
        log.exception("cannot classify %r", problem)
        return Outcome(Kind.TEMPORARY, None, "4.3.0", "internal error while classifying a failure",
                       engine, host)


def _classify(exc: BaseException, *, engine: str, host: Optional[str], stage: Stage) -> Outcome:
    def temp(enhanced: str, text: str) -> Outcome:
        return Outcome(Kind.TEMPORARY, None, enhanced, clean_text(text), engine, host)

    def perm(enhanced: str, text: str, final: bool = False, code: Optional[int] = None) -> Outcome:
        return Outcome(Kind.PERMANENT, code, enhanced, clean_text(text), engine, host, final)

    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
            stage = Stage.GREETING
        elif isinstance(exc, aiosmtplib.SMTPHeloError):
            stage = Stage.EHLO
        elif isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            stage = Stage.AUTH
        return from_reply(exc.code, exc.message, engine=engine, host=host, stage=stage)

    tls_error = _ssl_error_in(exc)
    if tls_error is not None or stage is Stage.TLS:
        detail = tls_error if tls_error is not None else exc
        return temp("4.7.5", f"TLS failure with {host or engine}: {_describe(detail)}")

    if isinstance(exc, (aiosmtplib.SMTPConnectTimeoutError,)):
        return temp("4.4.1", f"connection to {host or engine} timed out")
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        return temp("4.4.1", f"cannot connect to {host or engine}: {_describe(exc)}")
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError)):
        return temp("4.4.2", f"{host or engine} did not answer in time ({stage.value})")
    if isinstance(exc, DISCONNECTED):
        return temp("4.4.2", f"connection to {host or engine} lost ({stage.value})")

    dns_problem = _dns_outcome(exc, temp, perm)
    if dns_problem is not None:
        return dns_problem

    if isinstance(exc, UnicodeError):
        # a non-ASCII address for a server that does not speak SMTPUTF8
        return perm("5.6.7", "address needs SMTPUTF8, which the server does not offer",
                    code=553)
    if isinstance(exc, ValueError):
        # aiosmtplib refuses control characters and stray brackets in addresses
        if stage is Stage.RCPT:
            return perm("5.1.3", f"bad recipient address syntax: {_describe(exc)}",
                        final=True, code=501)
        return perm("5.1.7", f"bad sender address syntax: {_describe(exc)}", code=501)

    if isinstance(exc, aiosmtplib.SMTPException):
        # SMTPNotSupported and friends: the server lacks something we need
        return temp("4.3.0", f"{host or engine}: {_describe(exc)}")
    if isinstance(exc, OSError):
        return temp("4.4.1", f"network error with {host or engine}: {_describe(exc)}")

    log.error("unexpected error delivering through %s (%s): %r", engine, host, exc,
              exc_info=exc)
    return temp("4.3.0", f"internal error ({type(exc).__name__})")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return clean_text(text, 200)


def _dns_outcome(exc: BaseException, temp, perm) -> Optional[Outcome]:  # type: ignore[no-untyped-def]
    """The outcome of a dnspython error, None for anything else.

    dnspython is looked up, not imported: a relay without a direct engine or an `mx` rule
    never loads it (4 MiB), and then no DNS error can exist."""
    exception = sys.modules.get("dns.exception")
    if exception is None or not isinstance(exc, exception.DNSException):
        return None
    resolver = sys.modules.get("dns.resolver")
    if resolver is not None:
        if isinstance(exc, resolver.NXDOMAIN):
            return perm("5.1.2", f"domain does not exist: {_dns_names(exc)}", final=True, code=550)
        if isinstance(exc, (resolver.NoNameservers, resolver.LifetimeTimeout)):
            return temp("4.4.3", f"DNS lookup failed, will retry: {_describe(exc)}")
    if isinstance(exc, exception.Timeout):
        return temp("4.4.3", f"DNS lookup failed, will retry: {_describe(exc)}")
    return temp("4.4.3", f"DNS lookup failed: {_describe(exc)}")


def _dns_names(exc: BaseException) -> str:
    names = getattr(exc, "qnames", lambda: [])()
    return ", ".join(str(n).rstrip(".") for n in names) or "unknown"


# --- outcomes the engines make themselves (still decided here) ---------------------

def too_large(size: int, limit: int, *, engine: str, host: Optional[str]) -> Outcome:
    """An engine whose SIZE (or `max size`) is below the message: skip it, not final."""
    return Outcome(Kind.PERMANENT, 552, "5.3.4",
                   f"message size {size} exceeds the limit {limit} of {host or engine}",
                   engine, host)


def null_mx(domain: str, *, engine: str) -> Outcome:
    """RFC 7505: the domain accepts no mail. A destination verdict."""
    return Outcome(Kind.PERMANENT, 556, "5.1.10",
                   f"domain {clean_text(domain, 255)} does not accept mail (null MX)",
                   engine, None, final=True)


def no_route(domain: str, *, engine: str) -> Outcome:
    """No MX host of the domain has an address: permanent, but another engine may know better."""
    return Outcome(Kind.PERMANENT, 550, "5.4.4",
                   f"unable to route: no address for the mail hosts of {clean_text(domain, 255)}",
                   engine, None)


def bad_domain(domain: str, why: str, *, engine: str) -> Outcome:
    """A recipient domain that cannot even be a DNS name: a destination verdict."""
    return Outcome(Kind.PERMANENT, 550, "5.1.2",
                   f"bad destination domain {clean_text(domain, 255)}: {clean_text(why, 100)}",
                   engine, None, final=True)


def dns_temporary(domain: str, detail: str, *, engine: str) -> Outcome:
    return Outcome(Kind.TEMPORARY, 451, "4.4.3",
                   f"DNS lookup for {clean_text(domain, 255)} failed: {clean_text(detail, 200)}",
                   engine, None)


def tls_required(*, engine: str, host: Optional[str], why: str) -> Outcome:
    """The engine's policy needs TLS the server does not provide: an engine fault."""
    return Outcome(Kind.TEMPORARY, None, "4.7.4", clean_text(why), engine, host)


def engine_problem(why: str, *, engine: str, host: Optional[str] = None,
                   enhanced: str = "4.3.0") -> Outcome:
    """A temporary engine fault found locally (no AUTH offered, engine closing...)."""
    return Outcome(Kind.TEMPORARY, None, enhanced, clean_text(why), engine, host)


def smtputf8_unsupported(*, engine: str, host: Optional[str]) -> Outcome:
    return Outcome(Kind.PERMANENT, 553, "5.6.7",
                   f"{host or engine} does not offer SMTPUTF8, which this message needs",
                   engine, host)


def bad_recipient(address: str, *, engine: str) -> Outcome:
    return Outcome(Kind.PERMANENT, 501, "5.1.3",
                   f"bad recipient address: {clean_text(address, 255)}", engine, None, final=True)


def rank(outcome: Outcome) -> int:
    """How good an outcome is when several hosts answered for one recipient (higher wins):
    delivered, then a destination verdict, then temporary (worth a retry), then permanent."""
    if outcome.delivered:
        return 3
    if outcome.final:
        return 2
    if outcome.temporary:
        return 1
    return 0
