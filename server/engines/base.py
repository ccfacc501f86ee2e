"""What every delivery engine shares: the values, the protocol, and the SMTP client side.

Owns:
* `Envelope` (what to send), `EngineContext` (relay-wide settings an engine needs),
  the `Engine` protocol and `build_engine()`;
* `open_session()`: connect, EHLO, STARTTLS per policy, AUTH only over TLS;
* `run_transaction()`: one MAIL/RCPT.../DATA transaction with per-recipient outcomes;
* `ConnectionPool`: at most N open connections per engine, idle ones kept for reuse;
* `PooledEngine`: what both SMTP engines do around a delivery (each recipient once,
  refusal while closing, the size limit, one transaction on a pooled or new connection).

Never decides what a failure means (that is `server.outcome`), never touches the queue,
never raises out of `deliver()`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Hashable, Literal, Optional, Protocol, Sequence

import aiosmtplib
import aiosmtplib.protocol as _protocol

from server import outcome as oc
from server.outcome import Outcome, Stage

if TYPE_CHECKING:
    from routedsl.table import EngineSpec

log = logging.getLogger("routedsl.engines")


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

def client_tls_context(*, verify: bool, ca_file: Optional[str] = None) -> ssl.SSLContext:
    """A client context built once per engine (loading the system store is not free)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if verify:
        if ca_file:
            context.load_verify_locations(cafile=ca_file)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
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


async def run_transaction(client: aiosmtplib.SMTP, envelope: Envelope, recipients: Sequence[str],
                          *, engine: str, host: str, timeout: float,
                          final_timeout: float) -> tuple[dict[str, Outcome], bool]:
    """One MAIL, a RCPT per recipient, one DATA. Returns (outcome per recipient, reusable).

    Refused recipients get their RCPT reply; accepted ones the DATA reply; when every
    recipient is refused no DATA is sent. `reusable` says whether the connection is in a
    clean state for another message. Never raises except for cancellation.
    """
    size = len(envelope.data)
    limit = advertised_size(client)
    if limit is not None and size > limit:
        skipped = oc.too_large(size, limit, engine=engine, host=host)
        return {r: skipped for r in recipients}, True
    if envelope.smtputf8 and not client.supports_extension("smtputf8"):
        refused = oc.smtputf8_unsupported(engine=engine, host=host)
        return {r: refused for r in recipients}, True

    options = []
    if client.supports_extension("size"):
        options.append(f"SIZE={size}")
    if client.supports_extension("8bitmime") and not envelope.data.isascii():
        options.append("BODY=8BITMIME")
    if envelope.smtputf8:
        options.append("SMTPUTF8")
    encoding = "utf-8" if envelope.smtputf8 else "ascii"

    def broken(exc: BaseException, stage: Stage, whom: Sequence[str]) -> tuple[dict[str, Outcome], bool]:
        failed = oc.classify(exc, engine=engine, host=host, stage=stage)
        for r in whom:
            outcomes.setdefault(r, failed)
        client.close()
        return outcomes, False

    outcomes: dict[str, Outcome] = {}
    try:
        await client.mail(envelope.sender, options=options, encoding=encoding, timeout=timeout)
    except (aiosmtplib.SMTPResponseException, ValueError, UnicodeError) as exc:
        if _garbled(exc):
            return broken(exc, Stage.MAIL, recipients)
        refused = oc.classify(exc, engine=engine, host=host, stage=Stage.MAIL)
        return {r: refused for r in recipients}, await _reset(client, timeout)
    except Exception as exc:
        return broken(exc, Stage.MAIL, recipients)

    accepted: list[str] = []
    overflow: list[str] = []  # "452 too many recipients": worth another transaction
    for rcpt in recipients:
        try:
            await client.rcpt(rcpt, encoding=encoding, timeout=timeout)
            accepted.append(rcpt)
        except (ValueError, UnicodeError) as exc:  # refused locally, nothing was sent
            outcomes[rcpt] = oc.classify(exc, engine=engine, host=host, stage=Stage.RCPT)
        except aiosmtplib.SMTPResponseException as exc:
            if _garbled(exc):
                return broken(exc, Stage.RCPT, recipients)
            outcomes[rcpt] = oc.classify(exc, engine=engine, host=host, stage=Stage.RCPT)
            if not client.is_connected:  # 421: the server is going away
                for r in recipients:
                    outcomes.setdefault(r, outcomes[rcpt])
                return outcomes, False
            if exc.code == 452 and accepted:
                overflow.append(rcpt)
        except Exception as exc:
            return broken(exc, Stage.RCPT, recipients)

    if not accepted:
        return outcomes, await _reset(client, timeout)

    try:
        response = await send_data(client, envelope.data, timeout=timeout,
                                   final_timeout=final_timeout)
    except aiosmtplib.SMTPResponseException as exc:
        if _garbled(exc):
            return broken(exc, Stage.DATA, accepted)
        refused = oc.classify(exc, engine=engine, host=host, stage=Stage.DATA)
        for r in accepted:
            outcomes[r] = refused
        return outcomes, client.is_connected and await _reset(client, timeout)
    except Exception as exc:
        if isinstance(exc, (aiosmtplib.SMTPTimeoutError, aiosmtplib.SMTPServerDisconnected)):
            log.warning("%s: no reply to the final dot from %s: message may be delivered "
                        "more than once", envelope.queue_id, host)
        return broken(exc, Stage.DATA, accepted)
    done = oc.delivered(response.message, engine=engine, host=host, code=response.code)
    for r in accepted:
        outcomes[r] = done
    if overflow:
        # RFC 5321 §4.5.3.1.10: the server took some; send the rest in a new transaction
        more, reusable = await run_transaction(client, envelope, overflow, engine=engine,
                                               host=host, timeout=timeout,
                                               final_timeout=final_timeout)
        outcomes.update(more)
        return outcomes, reusable
    return outcomes, True


async def send_data(client: aiosmtplib.SMTP, data: bytes, *, timeout: float,
                    final_timeout: float) -> aiosmtplib.SMTPResponse:
    """DATA with two clocks: the 354 within the command timeout, the reply to the final
    dot within `final_timeout` (RFC 5321 §4.5.3.2.6: 10 minutes; a short wait there turns
    slow receivers into duplicates). aiosmtplib's data() has one timeout for both.

    The payload is prepared as aiosmtplib's own data() does: line ends normalized to
    CRLF, leading dots doubled, then the terminating dot.
    """
    start = await client.execute_command(b"DATA", timeout=timeout)
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    payload = _protocol.PERIOD_REGEX.sub(b"..", _protocol.normalize_message_line_endings(data))
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        protocol.write(payload + b".\r\n")
        response = await protocol.read_response(timeout=final_timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()  # a late reply must never be paired with a later command
        raise
    if response.code != 250:
        if response.code == 421:
            client.close()
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


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


class ConnectionPool:
    """At most `limit` open connections for one engine, idle ones kept per key.

    An idle connection holds its slot; when every slot is taken and a caller needs a
    connection to another key, the oldest idle connection is closed to make room.
    Idle connections are closed after `idle_timeout` seconds.
    """

    def __init__(self, limit: int, idle_timeout: float) -> None:
        self._limit = max(1, limit)
        self._idle_timeout = idle_timeout
        self._open = 0
        self._peak = 0
        self._idle: dict[Hashable, list[_Idle]] = {}
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
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
        while True:
            entries = self._idle.get(key)
            while entries:
                entry = entries.pop()
                entry.timer.cancel()
                if entry.client.is_connected:
                    return entry.client
                self._open -= 1  # it died while idle
            if self._open < self._limit:
                self._open += 1
                self._peak = max(self._peak, self._open)
                return None
            if self._evict_oldest():
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # we were woken but leave: pass it on
                else:
                    self._waiters.remove(waiter)
                raise

    def checkin(self, key: Hashable, client: aiosmtplib.SMTP, reusable: bool) -> None:
        """Give a connection back: kept idle when clean, closed otherwise."""
        if reusable and client.is_connected and not self._closed:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self._idle_timeout, self._expire, key, client)
            self._idle.setdefault(key, []).append(_Idle(client, time.monotonic(), timer))
        else:
            client.close()
            self._open -= 1
        self._wake()

    def release_slot(self) -> None:
        """A slot reserved by `checkout()` whose connection never opened."""
        self._open -= 1
        self._wake()

    def _expire(self, key: Hashable, client: aiosmtplib.SMTP) -> None:
        entries = self._idle.get(key, [])
        for i, entry in enumerate(entries):
            if entry.client is client:
                del entries[i]
                self._close_idle(entry)
                self._wake()
                return

    def _evict_oldest(self) -> bool:
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
        self._close_idle(entry)
        return True

    def _close_idle(self, entry: _Idle) -> None:
        entry.timer.cancel()
        entry.client.close()
        self._open -= 1

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

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
        self._open -= len(entries)
        self._wake()


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
        """One transaction on an idle pooled connection for `key` (checked with RSET), else on
        a new session opened with `plan()`. When opening fails, the slot is given back and
        `retry(failed)` says whether to try again; if not, its outcome is every recipient's."""
        while True:
            client = await self._pool.checkout(key)
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
            else:
                # a pooled connection: make sure it is alive and clean before using it
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
                outcomes, reusable = await run_transaction(
                    client, envelope, rcpts, engine=self.name, host=host,
                    timeout=self.spec.timeout, final_timeout=self._ctx.final_timeout)
            finally:
                self._pool.checkin(key, client, reusable)
            return outcomes

    async def aclose(self) -> None:
        await self._inflight.drain()
        await self._pool.aclose()
