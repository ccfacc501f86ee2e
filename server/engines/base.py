"""What every delivery engine shares: the values, the protocol, and the SMTP client side.

Owns:
* `Envelope` (what to send), `EngineContext` (relay-wide settings an engine needs),
  the `Engine` protocol and `build_engine()`;
* `open_session()`: connect, EHLO, STARTTLS per policy, AUTH only over TLS;
* `transact()`: one MAIL/RCPT.../DATA transaction with per-recipient
  outcomes, pipelined (RFC 2920) when the server offers it (the bytes themselves:
  server/engines/wire.py);
* `ConnectionPool`: at most N open connections per engine, idle ones kept for reuse
  (warmest first), freed connections handed to waiters in arrival order;
* `PooledEngine`: what both SMTP engines do around a delivery (each recipient once,
  refusal while closing, the size limit, one transaction on a pooled or new connection).

Never decides what a failure means (that is `server.outcome`), never touches the queue,
never raises out of `deliver()`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import ssl
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Hashable, Literal, Optional, Protocol, Sequence

import aiosmtplib
import aiosmtplib.protocol as _protocol

from server import outcome as oc
from server.engines.wire import Replies, command, payload
from server.outcome import Outcome, Stage

if TYPE_CHECKING:
    from routedsl.table import EngineSpec

log = logging.getLogger("routedsl.engines")

# a pooled connection idle for longer than this is checked with RSET before it is used
RSET_AFTER_IDLE = 1.0


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message to deliver. `sender` '' is the null sender (bounces)."""
    queue_id: str
    sender: str
    data: bytes
    smtputf8: bool = False


@dataclass(frozen=True, slots=True)
class EngineContext:
    """Relay-wide settings the engines need (built once from the serve flags).

    nameservers: "IP" or "IP:PORT" each; empty means the system resolver.
    ca_file: extra trusted CAs for smarthost certificates, on top of the system store.
    final_timeout: how long to wait for the reply to the final dot (RFC 5321: 10 min).
    pool_idle: seconds an unused connection is kept open for the next message.
    """
    hostname: str
    nameservers: tuple[str, ...] = ()
    ca_file: Optional[str] = None
    dns_timeout: float = 5.0
    final_timeout: float = 600.0
    pool_idle: float = 30.0


class Engine(Protocol):
    name: str
    spec: "EngineSpec"

    async def deliver(self, envelope: Envelope, recipients: Sequence[str]) -> dict[str, Outcome]:
        """One outcome per recipient; never raises."""
        ...

    async def aclose(self) -> None:
        """Wait for deliveries in flight, then close pooled connections."""
        ...


def build_engine(spec: "EngineSpec", secret: Optional[str], ctx: EngineContext) -> Engine:
    """The engine for one declaration. `secret` is the resolved password (server.secrets).

    Opens nothing: connections are made on the first delivery. Raises ValueError for an
    unknown kind and OSError (ssl.SSLError) when `ctx.ca_file` cannot be loaded.
    """
    if spec.kind == "direct":
        from server.engines.direct import DirectEngine
        return DirectEngine(spec, ctx)
    if spec.kind in ("smtp", "smtps"):
        from server.engines.smarthost import SmarthostEngine
        return SmarthostEngine(spec, secret, ctx)
    raise ValueError(f"unknown engine kind {spec.kind!r}")


# --- TLS -----------------------------------------------------------------------------

_contexts: "weakref.WeakValueDictionary[tuple[object, ...], ssl.SSLContext]" = weakref.WeakValueDictionary()


def client_tls_context(*, verify: bool, ca_file: Optional[str] = None) -> ssl.SSLContext:
    """A client context, shared by every engine with the same settings while any uses it.

    Loading the system store costs 1-2 MiB per context, so engines share one, and a
    context that verifies nothing loads no store at all. A CA file is read again when it
    changed (size or modification time), e.g. before a reload. Read-only once made.
    """
    stamp = None
    if verify and ca_file:
        info = os.stat(ca_file)
        stamp = (info.st_size, info.st_mtime_ns)
    key = (verify, ca_file if verify else None, stamp)
    context = _contexts.get(key)
    if context is None:
        context = _new_tls_context(verify, ca_file)
        _contexts[key] = context
    return context


def _new_tls_context(verify: bool, ca_file: Optional[str]) -> ssl.SSLContext:
    if not verify:
        # what create_default_context() makes, minus the system store nobody would consult
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def tls_active(client: aiosmtplib.SMTP) -> bool:
    return client.get_transport_info("sslcontext") is not None


# --- opening a session ---------------------------------------------------------------

class SessionFailed(Exception):
    """Opening a session failed; `.outcome` says how. `.tls_failed` marks a failed handshake."""

    def __init__(self, outcome: Outcome, tls_failed: bool = False) -> None:
        super().__init__(outcome.reply)
        self.outcome = outcome
        self.tls_failed = tls_failed


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """How to open one session: where, and with which TLS and AUTH policy."""
    engine: str
    address: str                      # what to connect to (host name or IP)
    port: int
    server_name: str                  # for SNI/verification and in outcomes
    helo: str
    timeout: float
    implicit_tls: bool = False
    starttls: Literal["required", "opportunistic", "none"] = "opportunistic"
    tls_context: Optional[ssl.SSLContext] = None
    user: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)


async def _ehlo(client: aiosmtplib.SMTP, helo: str) -> None:
    try:
        await client.ehlo(hostname=helo)
    except aiosmtplib.SMTPHeloError as exc:
        # an old server that does not know EHLO: fall back to HELO (not after a 421)
        if exc.code == 421 or not client.is_connected:
            raise
        await client.helo(hostname=helo)


async def open_session(plan: SessionPlan) -> aiosmtplib.SMTP:
    """Connect and get a session ready for MAIL. Raises SessionFailed only."""
    host = plan.server_name
    try:
        client = aiosmtplib.SMTP(
            hostname=plan.address, port=plan.port, local_hostname=plan.helo,
            timeout=plan.timeout, use_tls=plan.implicit_tls, start_tls=False,
            tls_context=plan.tls_context if plan.implicit_tls else None,
        )
    except ValueError as exc:  # a HELO name aiosmtplib will not send
        raise SessionFailed(oc.engine_problem(f"cannot use this EHLO name: {exc}",
                                              engine=plan.engine, host=host)) from None
    stage = Stage.CONNECT
    try:
        await client.connect()
        stage = Stage.EHLO
        await _ehlo(client, plan.helo)
        if not plan.implicit_tls and plan.starttls != "none":
            if client.supports_extension("starttls"):
                stage = Stage.TLS
                await client.starttls(tls_context=plan.tls_context, server_hostname=plan.server_name)
                stage = Stage.EHLO
                await _ehlo(client, plan.helo)
            elif plan.starttls == "required":
                raise SessionFailed(oc.tls_required(
                    engine=plan.engine, host=host,
                    why=f"TLS is required, but {host} does not offer STARTTLS"))
        if plan.user is not None:
            if not tls_active(client):
                raise SessionFailed(oc.tls_required(
                    engine=plan.engine, host=host,
                    why=f"credentials are never sent without TLS, and {host} offers none"))
            stage = Stage.AUTH
            await _authenticate(client, plan)
        return client
    except SessionFailed:
        client.close()
        raise
    except asyncio.CancelledError:
        client.close()
        raise
    except Exception as exc:
        client.close()
        result = oc.classify(exc, engine=plan.engine, host=host, stage=stage)
        raise SessionFailed(result, tls_failed=(stage is Stage.TLS)) from None


async def _authenticate(client: aiosmtplib.SMTP, plan: SessionPlan) -> None:
    methods = client.server_auth_methods
    password = plan.password or ""
    assert plan.user is not None
    if "plain" in methods:
        await client.auth_plain(plan.user, password)
    elif "login" in methods:
        await client.auth_login(plan.user, password)
    elif not client.supports_extension("auth"):
        raise SessionFailed(oc.engine_problem(
            f"{plan.server_name} offers no AUTH, and this engine has a user",
            engine=plan.engine, host=plan.server_name, enhanced="4.7.0"))
    else:
        raise SessionFailed(oc.engine_problem(
            f"{plan.server_name} offers no AUTH mechanism we use (PLAIN, LOGIN)",
            engine=plan.engine, host=plan.server_name, enhanced="4.7.0"))


# --- one transaction -----------------------------------------------------------------

def advertised_size(client: aiosmtplib.SMTP) -> Optional[int]:
    """The EHLO SIZE limit, None when absent or 0 (RFC 1870: 0 means no fixed limit)."""
    raw = client.esmtp_extensions.get("size")
    if raw is None:
        return None
    try:
        value = int(raw.split()[0]) if raw.strip() else 0
    except ValueError:
        return None
    return value or None


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one transaction left behind.

    `reusable`: the connection is in a clean state for another message.
    `stale`: the connection went away (closed, or 421) before the server accepted any
    recipient, so no message was sent; on a pooled connection that means it died while
    idle, and another connection may carry the same transaction at once.
    """
    outcomes: dict[str, Outcome]
    reusable: bool
    stale: bool = False


async def transact(client: aiosmtplib.SMTP, envelope: Envelope, recipients: Sequence[str],
                   *, engine: str, host: str, timeout: float, final_timeout: float) -> Attempt:
    """One MAIL, a RCPT per recipient, one DATA; outcomes, reusable and stale in an Attempt.

    Refused recipients get their RCPT reply; accepted ones the DATA reply; when every
    recipient is refused no message is sent. Never raises except for cancellation.

    With a server that offers PIPELINING (RFC 2920) MAIL, every RCPT and DATA go out in
    one write and their replies are read together; otherwise one command per round trip.
    The outcomes are the same either way.
    """
    size = len(envelope.data)
    limit = advertised_size(client)
    if limit is not None and size > limit:
        skipped = oc.too_large(size, limit, engine=engine, host=host)
        return Attempt({r: skipped for r in recipients}, True)
    if envelope.smtputf8 and not client.supports_extension("smtputf8"):
        refused = oc.smtputf8_unsupported(engine=engine, host=host)
        return Attempt({r: refused for r in recipients}, True)

    options = []
    if client.supports_extension("size"):
        options.append(f"SIZE={size}")
    if client.supports_extension("8bitmime") and not envelope.data.isascii():
        options.append("BODY=8BITMIME")
    if envelope.smtputf8:
        options.append("SMTPUTF8")
    step = _Step(client, envelope, recipients, engine, host, timeout, final_timeout, options)
    if client.supports_extension("pipelining"):
        attempt = await step.pipelined()
    else:
        attempt = await step.one_by_one()
    if step.overflow and step.sent and attempt.reusable:
        # RFC 5321 §4.5.3.1.10: the server took some; send the rest in a new transaction
        more = await transact(client, envelope, step.overflow, engine=engine, host=host,
                              timeout=timeout, final_timeout=final_timeout)
        outcomes = dict(attempt.outcomes)
        outcomes.update(more.outcomes)
        return Attempt(outcomes, more.reusable)
    return attempt


class _Step:
    """The state of one transaction: outcomes so far, accepted and overflowing recipients."""

    def __init__(self, client: aiosmtplib.SMTP, envelope: Envelope, recipients: Sequence[str],
                 engine: str, host: str, timeout: float, final_timeout: float,
                 options: list[str]) -> None:
        self.client = client
        self.envelope = envelope
        self.recipients = recipients
        self.engine = engine
        self.host = host
        self.timeout = timeout
        self.final_timeout = final_timeout
        self.options = options
        self.encoding = "utf-8" if envelope.smtputf8 else "ascii"
        self.outcomes: dict[str, Outcome] = {}
        self.accepted: list[str] = []
        self.overflow: list[str] = []  # "452 too many recipients": worth another transaction
        self.sent = False  # the message was accepted (250 after the final dot)

    def classify(self, exc: BaseException, stage: Stage) -> Outcome:
        return oc.classify(exc, engine=self.engine, host=self.host, stage=stage)

    def broken(self, exc: BaseException, stage: Stage, whom: Sequence[str],
               stale: bool = False) -> Attempt:
        failed = self.classify(exc, stage)
        for r in whom:
            self.outcomes.setdefault(r, failed)
        self.client.close()
        return Attempt(self.outcomes, False, stale)

    def nothing_taken(self, exc: BaseException) -> bool:
        """The connection died before the server accepted any recipient: nothing was sent."""
        return not self.accepted and isinstance(exc, oc.DISCONNECTED)

    def sender_refused(self, exc: BaseException) -> dict[str, Outcome]:
        refused = self.classify(exc, Stage.MAIL)
        return {r: refused for r in self.recipients}

    def recipient_refused(self, rcpt: str, exc: aiosmtplib.SMTPResponseException) -> bool:
        """Record a refused RCPT; False when the server is going away (421)."""
        self.outcomes[rcpt] = self.classify(exc, Stage.RCPT)
        if exc.code == 421 or not self.client.is_connected:
            self.client.close()
            for r in self.recipients:
                self.outcomes.setdefault(r, self.outcomes[rcpt])
            return False
        if exc.code == 452 and self.accepted:
            self.overflow.append(rcpt)
        return True

    def data_refused(self, exc: aiosmtplib.SMTPResponseException) -> None:
        refused = self.classify(exc, Stage.DATA)
        for r in self.accepted:
            self.outcomes[r] = refused

    def delivered(self, response: aiosmtplib.SMTPResponse) -> Attempt:
        done = oc.delivered(response.message, engine=self.engine, host=self.host,
                            code=response.code)
        for r in self.accepted:
            self.outcomes[r] = done
        self.sent = True
        return Attempt(self.outcomes, True)

    def no_final_reply(self) -> None:
        log.warning("%s: no reply to the final dot from %s: message may be delivered "
                    "more than once", self.envelope.queue_id, self.host)

    # -- one command per round trip ----------------------------------------------------

    async def one_by_one(self) -> Attempt:
        client, timeout = self.client, self.timeout
        try:
            await client.mail(self.envelope.sender, options=self.options,
                              encoding=self.encoding, timeout=timeout)
        except (aiosmtplib.SMTPResponseException, ValueError, UnicodeError) as exc:
            if _garbled(exc):
                return self.broken(exc, Stage.MAIL, self.recipients)
            outcomes = self.sender_refused(exc)
            if getattr(exc, "code", None) == 421:
                client.close()
                return Attempt(outcomes, False, stale=True)
            return Attempt(outcomes, await _reset(client, timeout))
        except Exception as exc:
            return self.broken(exc, Stage.MAIL, self.recipients,
                               stale=isinstance(exc, oc.DISCONNECTED))

        for rcpt in self.recipients:
            try:
                await client.rcpt(rcpt, encoding=self.encoding, timeout=timeout)
                self.accepted.append(rcpt)
            except (ValueError, UnicodeError) as exc:  # refused locally, nothing was sent
                self.outcomes[rcpt] = self.classify(exc, Stage.RCPT)
            except aiosmtplib.SMTPResponseException as exc:
                if _garbled(exc):
                    return self.broken(exc, Stage.RCPT, self.recipients)
                if not self.recipient_refused(rcpt, exc):
                    return Attempt(self.outcomes, False, stale=not self.accepted)
            except Exception as exc:
                return self.broken(exc, Stage.RCPT, self.recipients, stale=self.nothing_taken(exc))

        if not self.accepted:
            return Attempt(self.outcomes, await _reset(client, timeout))

        try:
            response = await send_data(client, self.envelope.data, timeout=timeout,
                                       final_timeout=self.final_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            if _garbled(exc):
                return self.broken(exc, Stage.DATA, self.accepted)
            self.data_refused(exc)
            return Attempt(self.outcomes, client.is_connected and await _reset(client, timeout))
        except Exception as exc:
            if isinstance(exc, (aiosmtplib.SMTPTimeoutError, aiosmtplib.SMTPServerDisconnected)):
                self.no_final_reply()
            return self.broken(exc, Stage.DATA, self.accepted)
        return self.delivered(response)

    # -- RFC 2920 pipelining -----------------------------------------------------------

    async def pipelined(self) -> Attempt:
        client = self.client
        try:
            mail = command(b"MAIL", b"FROM:", self.envelope.sender, self.encoding, self.options)
        except (ValueError, UnicodeError) as exc:  # refused locally, nothing was sent
            return Attempt(self.sender_refused(exc), client.is_connected)
        sent: list[str] = []
        lines = [mail]
        for rcpt in self.recipients:
            try:
                lines.append(command(b"RCPT", b"TO:", rcpt, self.encoding, ()))
                sent.append(rcpt)
            except (ValueError, UnicodeError) as exc:
                self.outcomes[rcpt] = self.classify(exc, Stage.RCPT)
        if not sent:
            return Attempt(self.outcomes, client.is_connected)
        lines.append(b"DATA\r\n")

        protocol = client.protocol
        transport = protocol.transport if protocol is not None else None
        if protocol is None or transport is None or transport.is_closing():
            exc = aiosmtplib.SMTPServerDisconnected("Connection lost")
            return self.broken(exc, Stage.MAIL, self.recipients, stale=True)
        replies = Replies(protocol, expected=len(lines) + 1)  # and the final dot's
        transport.set_protocol(replies)
        try:
            attempt, reset = await self._exchange(protocol, replies, b"".join(lines), sent)
        finally:
            if protocol.transport is not None:
                protocol.transport.set_protocol(protocol)
                if replies.unread():  # more than we asked for: the session is not in step
                    client.close()
        if reset:
            return Attempt(attempt.outcomes, await _reset(client, self.timeout), attempt.stale)
        if attempt.reusable and not client.is_connected:
            return Attempt(attempt.outcomes, False, attempt.stale)
        return attempt

    async def _exchange(self, protocol: _protocol.SMTPProtocol, replies: Replies,
                        commands: bytes, sent: list[str]) -> tuple[Attempt, bool]:
        """Write the group, read its replies in order. Returns (attempt, needs RSET)."""
        client, timeout = self.client, self.timeout
        try:
            protocol.write(commands)
            reply = await replies.next(timeout)
        except aiosmtplib.SMTPResponseException as exc:  # garbled
            return self.broken(exc, Stage.MAIL, self.recipients), False
        except Exception as exc:
            return self.broken(exc, Stage.MAIL, self.recipients,
                               stale=isinstance(exc, oc.DISCONNECTED)), False
        if reply.code != 250:
            outcomes = self.sender_refused(
                aiosmtplib.SMTPSenderRefused(reply.code, reply.message, self.envelope.sender))
            if reply.code == 421:
                client.close()
                return Attempt(outcomes, False, stale=True), False
            # the RCPTs and DATA are answered too (503): read them to stay in step
            try:
                for _ in range(len(sent) + 1):
                    reply = await replies.next(timeout)
            except Exception:
                client.close()
                return Attempt(outcomes, False), False
            if reply.code == 354:  # DATA accepted without a sender: do not go on
                client.close()
                return Attempt(outcomes, False), False
            return Attempt(outcomes, False), True

        for rcpt in sent:
            try:
                reply = await replies.next(timeout)
            except Exception as exc:
                return self.broken(exc, Stage.RCPT, self.recipients,
                                   stale=self.nothing_taken(exc)), False
            if reply.code in (250, 251):
                self.accepted.append(rcpt)
                continue
            refusal = aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, rcpt)
            if not self.recipient_refused(rcpt, refusal):
                return Attempt(self.outcomes, False, stale=not self.accepted), False

        try:
            reply = await replies.next(timeout)
        except Exception as exc:
            if self.accepted:
                return self.broken(exc, Stage.DATA, self.accepted), False
            client.close()
            return Attempt(self.outcomes, False, stale=self.nothing_taken(exc)), False
        if not self.accepted:
            if reply.code == 354:  # RFC 2920 §3.1 says 503/554 here; never send a body
                client.close()
                return Attempt(self.outcomes, False), False
            if reply.code == 421:
                client.close()
                return Attempt(self.outcomes, False), False
            return Attempt(self.outcomes, False), True
        if reply.code != 354:
            if 200 <= reply.code < 400:  # a success that is not "go ahead": out of step
                return self.broken(_out_of_step(reply), Stage.DATA, self.accepted), False
            if reply.code == 421:
                client.close()
            self.data_refused(aiosmtplib.SMTPDataError(reply.code, reply.message))
            return Attempt(self.outcomes, False), client.is_connected

        try:
            protocol.write(payload(self.envelope.data))
            reply = await replies.next(self.final_timeout)
        except aiosmtplib.SMTPResponseException as exc:  # garbled
            return self.broken(exc, Stage.DATA, self.accepted), False
        except Exception as exc:
            if isinstance(exc, (aiosmtplib.SMTPTimeoutError, aiosmtplib.SMTPServerDisconnected)):
                self.no_final_reply()
            return self.broken(exc, Stage.DATA, self.accepted), False
        if reply.code != 250:
            if reply.code == 421:
                client.close()
            self.data_refused(aiosmtplib.SMTPDataError(reply.code, reply.message))
            return Attempt(self.outcomes, False), client.is_connected
        return self.delivered(reply), False


async def send_data(client: aiosmtplib.SMTP, data: bytes, *, timeout: float,
                    final_timeout: float) -> aiosmtplib.SMTPResponse:
    """DATA with two clocks: the 354 within the command timeout, the reply to the final
    dot within `final_timeout` (RFC 5321 §4.5.3.2.6: 10 minutes; a short wait there turns
    slow receivers into duplicates). aiosmtplib's data() has one timeout for both.

    The payload is prepared as aiosmtplib's own data() does (`payload()`).
    """
    start = await client.execute_command(b"DATA", timeout=timeout)
    if start.code != 354:
        if 200 <= start.code < 400:  # a success that is not "go ahead": out of step
            client.close()
            raise _out_of_step(start)
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        protocol.write(payload(data))
        response = await protocol.read_response(timeout=final_timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()  # a late reply must never be paired with a later command
        raise
    if response.code != 250:
        if response.code == 421:
            client.close()
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


def _out_of_step(reply: aiosmtplib.SMTPResponse) -> aiosmtplib.SMTPResponseException:
    """DATA answered with a success other than 354: never a delivery, the session is lost."""
    return aiosmtplib.SMTPResponseException(-1, f"{reply.code} {reply.message} in reply to DATA")


def _garbled(exc: BaseException) -> bool:
    """A 'reply' that was not one (aiosmtplib code -1): the session cannot be trusted."""
    return isinstance(exc, aiosmtplib.SMTPResponseException) and not 200 <= exc.code < 600


async def _reset(client: aiosmtplib.SMTP, timeout: float) -> bool:
    """RSET after a refused transaction so the connection can carry the next one."""
    if not client.is_connected:
        return False
    try:
        await client.rset(timeout=timeout)
        return True
    except asyncio.CancelledError:
        client.close()
        raise
    except Exception:
        client.close()
        return False


# --- connection pool -----------------------------------------------------------------

@dataclass(slots=True)
class _Idle:
    client: aiosmtplib.SMTP
    since: float
    timer: asyncio.TimerHandle


@dataclass(slots=True)
class _Waiter:
    key: Hashable
    # set to (connection, idle seconds) handed over, or (None, 0) for a reserved slot
    future: "asyncio.Future[tuple[Optional[aiosmtplib.SMTP], float]]"


class ConnectionPool:
    """At most `limit` open connections for one engine, idle ones kept per key.

    Idle connections are reused last-in first-out (the warmest first) and closed after
    `idle_timeout` seconds. A connection or slot that comes free goes straight to the
    longest waiter, so exactly `limit` deliveries work at once and nobody jumps the line.
    When every slot is taken and a caller needs a connection to another key, the oldest
    idle connection is closed to make room.
    """

    def __init__(self, limit: int, idle_timeout: float) -> None:
        self._limit = max(1, limit)
        self._idle_timeout = idle_timeout
        self._open = 0
        self._peak = 0
        self._idle: dict[Hashable, list[_Idle]] = {}
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def peak(self) -> int:
        return self._peak

    async def checkout(self, key: Hashable) -> Optional[aiosmtplib.SMTP]:
        """An idle connection for `key`, or None with a slot reserved for a new one.

        A caller that got None must later call `checkin()` with the connection it opened
        or `release_slot()` if opening failed.
        """
        client, _ = await self.checkout_aged(key)
        return client

    async def checkout_aged(self, key: Hashable) -> tuple[Optional[aiosmtplib.SMTP], float]:
        """`checkout()`, with how many seconds the connection had been idle."""
        entries = self._idle.get(key)
        while entries:
            entry = entries.pop()
            entry.timer.cancel()
            if entry.client.is_connected:
                return entry.client, time.monotonic() - entry.since
            self._open -= 1  # it died while idle
        if self._open < self._limit and not self._waiters:
            self._reserve()
            return None, 0.0
        if not self._waiters and self._evict_oldest():
            self._reserve()
            return None, 0.0
        waiter = _Waiter(key, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.cancelled() or not waiter.future.done():
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            else:  # handed something, but we leave: pass it on
                client, _ = waiter.future.result()
                if client is not None:
                    self.checkin(key, client, True)
                else:
                    self.release_slot()
            raise

    def checkin(self, key: Hashable, client: aiosmtplib.SMTP, reusable: bool) -> None:
        """Give a connection back: handed to a waiter or kept idle when clean, closed otherwise."""
        if reusable and client.is_connected and not self._closed:
            waiter = self._next_waiter(key)
            if waiter is not None:
                waiter.future.set_result((client, 0.0))
                return
            if self._waiters:  # someone needs a slot for another key
                client.close()
                self._hand_slot()
                return
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self._idle_timeout, self._expire, key, client)
            self._idle.setdefault(key, []).append(_Idle(client, time.monotonic(), timer))
        else:
            client.close()
            self._hand_slot()

    def release_slot(self) -> None:
        """A slot reserved by `checkout()` whose connection never opened."""
        self._hand_slot()

    def _reserve(self) -> None:
        self._open += 1
        self._peak = max(self._peak, self._open)

    def _next_waiter(self, key: Hashable) -> Optional[_Waiter]:
        for waiter in self._waiters:
            if waiter.key == key and not waiter.future.done():
                self._waiters.remove(waiter)
                return waiter
        return None

    def _hand_slot(self) -> None:
        """A slot came free: the longest waiter gets it, else it is given back."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result((None, 0.0))
                return
        self._open -= 1

    def _expire(self, key: Hashable, client: aiosmtplib.SMTP) -> None:
        entries = self._idle.get(key, [])
        for i, entry in enumerate(entries):
            if entry.client is client:
                del entries[i]
                entry.timer.cancel()
                entry.client.close()
                self._hand_slot()
                return

    def _evict_oldest(self) -> bool:
        """Close the oldest idle connection and keep its slot for the caller."""
        oldest: Optional[tuple[Hashable, int, _Idle]] = None
        for key, entries in self._idle.items():
            for i, entry in enumerate(entries):
                if oldest is None or entry.since < oldest[2].since:
                    oldest = (key, i, entry)
        if oldest is None:
            return False
        key, i, entry = oldest
        del self._idle[key][i]
        entry.timer.cancel()
        entry.client.close()
        self._open -= 1
        return True

    async def aclose(self) -> None:
        """Say QUIT on every idle connection (briefly) and close it."""
        self._closed = True
        entries = [e for group in self._idle.values() for e in group]
        self._idle.clear()
        for e in entries:
            e.timer.cancel()

        async def quit(e: _Idle) -> None:
            try:
                await asyncio.wait_for(e.client.quit(timeout=2.0), 3.0)
            except Exception:
                pass
            finally:
                e.client.close()

        await asyncio.gather(*(quit(e) for e in entries))
        for _ in entries:
            self._hand_slot()


class InFlight:
    """Counts deliveries in progress so `aclose()` can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> bool:
        if self.closing:
            return False
        self.count += 1
        self._idle.clear()
        return True

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def drain(self) -> None:
        self.closing = True
        await self._idle.wait()


def unique(recipients: Sequence[str]) -> list[str]:
    """Recipients in order, each once (one RCPT per address)."""
    return list(dict.fromkeys(recipients))


async def guarded(engine: str, recipients: Sequence[str], work) -> dict[str, Outcome]:
    """Run an engine's delivery coroutine; turn any escaped error into outcomes."""
    try:
        result = await work
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("engine %s failed unexpectedly", engine)
        failed = oc.classify(exc, engine=engine, host=None, stage=Stage.LOCAL)
        return {r: failed for r in recipients}
    for r in recipients:  # an engine must answer for everyone it was given
        if r not in result:
            result[r] = oc.engine_problem("no outcome recorded for this recipient", engine=engine)
    return result


class PooledEngine:
    """The part of an SMTP engine (direct, smarthost) that does not depend on where it sends.

    `deliver()` gives each recipient one RCPT, refuses new work once `aclose()` has begun,
    skips a message over the engine's `max_size`, and turns anything that escapes into
    outcomes (`guarded`). A subclass implements `_deliver(envelope, rcpts)` and sends with
    `_transaction()`.
    """

    def __init__(self, spec: "EngineSpec", ctx: EngineContext) -> None:
        self.name = spec.name
        self.spec = spec
        self._ctx = ctx
        self._pool = ConnectionPool(spec.connections, ctx.pool_idle)
        self._inflight = InFlight()

    @property
    def pool(self) -> ConnectionPool:
        return self._pool

    async def deliver(self, envelope: Envelope, recipients: Sequence[str]) -> dict[str, Outcome]:
        rcpts = unique(recipients)
        if not rcpts:
            return {}
        if not self._inflight.enter():
            closed = oc.engine_problem("engine is shutting down", engine=self.name)
            return {r: closed for r in rcpts}
        try:
            return await guarded(self.name, rcpts, self._deliver_within_size(envelope, rcpts))
        finally:
            self._inflight.leave()

    async def _deliver_within_size(self, envelope: Envelope, rcpts: list[str]) -> dict[str, Outcome]:
        size = len(envelope.data)
        if self.spec.max_size is not None and size > self.spec.max_size:
            skipped = oc.too_large(size, self.spec.max_size, engine=self.name, host=self.spec.host)
            return {r: skipped for r in rcpts}
        return await self._deliver(envelope, rcpts)

    async def _deliver(self, envelope: Envelope, rcpts: list[str]) -> dict[str, Outcome]:
        raise NotImplementedError

    async def _transaction(self, key: Hashable, envelope: Envelope, rcpts: list[str], *, host: str,
                           plan: Callable[[], SessionPlan],
                           retry: Callable[[SessionFailed], bool]) -> dict[str, Outcome]:
        """One transaction on an idle pooled connection for `key`, else on a new session
        opened with `plan()`. When opening fails, the slot is given back and
        `retry(failed)` says whether to try again; if not, its outcome is every recipient's.

        A connection that finished its last transaction cleanly is already reset
        (RFC 5321 §4.1.1.4), so it is used as it is; one idle for longer than
        `RSET_AFTER_IDLE` is first checked with RSET. A pooled connection found dead before
        the server accepted any recipient (nothing sent) is dropped and the delivery goes
        on on another one."""
        while True:
            client, idle = await self._pool.checkout_aged(key)
            pooled = client is not None
            if client is None:
                try:
                    client = await open_session(plan())
                except SessionFailed as failed:
                    self._pool.release_slot()
                    if retry(failed):
                        continue
                    return {r: failed.outcome for r in rcpts}
                except BaseException:
                    self._pool.release_slot()
                    raise
            elif idle > RSET_AFTER_IDLE:
                # idle for a while: make sure it is alive before using it
                try:
                    await client.rset(timeout=self.spec.timeout)
                except asyncio.CancelledError:
                    self._pool.checkin(key, client, False)
                    raise
                except Exception:
                    self._pool.checkin(key, client, False)
                    continue
            reusable = False
            try:
                attempt = await transact(
                    client, envelope, rcpts, engine=self.name, host=host,
                    timeout=self.spec.timeout, final_timeout=self._ctx.final_timeout)
                reusable = attempt.reusable
            finally:
                self._pool.checkin(key, client, reusable)
            if attempt.stale and pooled:
                log.debug("%s: a pooled connection to %s had closed; using another",
                          envelope.queue_id, host)
                continue
            return attempt.outcomes

    async def aclose(self) -> None:
        await self._inflight.drain()
        await self._pool.aclose()
