"""The hardened SMTP protocol (an aiosmtpd SMTP subclass) and the listener factory.

This module owns the SMTP conversation up to the hand-over to the handler
(server/intake.py): what a client may say and when, and every bound on it.
aiosmtpd 1.4.6 gets smuggling and STARTTLS injection right; the gaps it leaves
(docs: reliability.md section 2.1, A1-A15) are closed here:

  * EHLO/HELO names, MAIL/RCPT paths and parameters are validated (server/hygiene.py);
    brackets are required; non-ASCII only with SMTPUTF8; `RCPT TO:<>` refused.
  * Relay access at RCPT (`554 5.7.1` unless the client is in the relay networks or
    authenticated), so nothing for a foreign client is ever queued.
  * AUTH PLAIN/LOGIN only over TLS (after STARTTLS or on an implicit-TLS listener),
    never during a transaction; a failed login answers `535 5.7.8` after a delay, is
    limited per connection (then `421`) and per client IP (then `454`), and the
    password check runs in a worker thread.
  * STARTTLS twice `554 5.5.1`, before EHLO `503 5.5.1`.
  * Bounds (server/limits.py): connections in all and per IP, recipients, commands,
    junk commands, line length, idle time, a whole-session deadline, a minimum data
    rate during DATA, a disk reserve at MAIL.
  * The DATA policy of server/hygiene.py is applied before the handler sees the
    message: the handler gets content with CRLF line ends only, no NUL, and a hop
    count within the limit.
  * Internal errors answer `451 4.3.0`; the traceback goes to the log, never to the client.

It never writes the spool and never decides routes; the handler does the first, the
scheduler the second.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import shutil
import socket
import ssl
import time
from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import aiosmtpd.smtp as aiosmtpd_smtp
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, TLSSetupException, _AuthMechAttr, syntax

from server import hygiene
from server.access import RelayAccess
from server.limits import Limits
from server.queue import DISK_FULL_ERRNOS
from server.text import clean_text

log = logging.getLogger("routedsl.smtp")
_mail_log = logging.getLogger("mail.log")   # aiosmtpd's own logger

JUNK_COMMANDS = frozenset({"NOOP", "RSET", "VRFY", "HELP", "EXPN"})
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"


class ListenerError(Exception):
    """The listeners cannot be set up as configured; the message says why."""


class _RedactAuth(logging.Filter):
    """aiosmtpd logs every command line at INFO: never let AUTH arguments reach a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
                isinstance(a, (bytes, str)) and a[:5].upper() in (b"AUTH ", "AUTH ") for a in record.args):
            record.args = tuple(
                (b"AUTH <redacted>" if isinstance(a, bytes) else "AUTH <redacted>")
                if isinstance(a, (bytes, str)) and a[:5].upper() in (b"AUTH ", "AUTH ") else a
                for a in record.args)
        return True


_mail_log.addFilter(_RedactAuth())


@dataclass(frozen=True, slots=True)
class Authenticated:
    """What a successful login leaves on the session (`session.auth_data`); no secret."""
    login: str


class ConnectionGate:
    """Counts open connections in all and per client IP (aiosmtpd has no cap, issue #282)."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: collections.Counter[str] = collections.Counter()

    def acquire(self, ip: str) -> Optional[str]:
        """None when the connection may go on, else the reply that refuses it."""
        if self.total >= self.max_total:
            return "421 4.3.2 Service busy, too many connections; try again later"
        if self.per_ip[ip] >= self.max_per_ip:
            return "421 4.7.0 Too many connections from your address; try again later"
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


class AuthLimiter:
    """Failed logins per client IP in a sliding window (Postfix anvil's auth rate)."""

    def __init__(self, max_failures: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._failures: dict[str, collections.deque[float]] = {}

    def _recent(self, ip: str) -> collections.deque[float]:
        times = self._failures.get(ip)
        if times is None:
            return collections.deque()
        horizon = self.clock() - self.window
        while times and times[0] < horizon:
            times.popleft()
        if not times:
            del self._failures[ip]
        return times

    def blocked(self, ip: str) -> bool:
        return len(self._recent(ip)) >= self.max_failures

    def failed(self, ip: str) -> None:
        self._recent(ip)
        self._failures.setdefault(ip, collections.deque()).append(self.clock())


class DataBudget:
    """Bytes of message data that all sessions together hold in memory (aiosmtpd buffers
    a whole message; without a shared bound, concurrent large messages exhaust memory)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


@dataclass(frozen=True, slots=True)
class ListenerState:
    """What all listeners of one relay share: the connection counts, the AUTH failures per IP,
    the message data in memory."""
    gate: ConnectionGate
    auth_limiter: AuthLimiter
    data_budget: DataBudget


def listener_state(limits: Limits, max_size: int) -> ListenerState:
    return ListenerState(
        gate=ConnectionGate(limits.max_connections, limits.max_connections_per_ip),
        auth_limiter=AuthLimiter(limits.max_auth_failures_per_ip, limits.auth_failure_window),
        data_budget=DataBudget(max(limits.max_data_memory, max_size)))


class _CommandSizeLimits(dict):
    """Longest command line per command; any command not named gets 512 (RFC 5321 4.5.3.1.4)
    without being added, so client-chosen command names never make it grow."""

    def __missing__(self, key: str) -> int:
        return 512


class RelaySMTP(SMTP):
    """One SMTP session of the relay: aiosmtpd's protocol with the relay's rules and bounds."""

    def __init__(self, handler: Any, *, limits: Limits, access: RelayAccess, hostname: str,
                 max_size: int, gate: ConnectionGate, auth_limiter: AuthLimiter,
                 data_budget: Optional[DataBudget] = None, users: Any = None,
                 tls_context: Optional[ssl.SSLContext] = None, implicit_tls: bool = False,
                 free_space: Optional[Callable[[], Optional[int]]] = None,
                 queue_usage: Optional[Callable[[], tuple[int, int]]] = None,
                 loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        # aiosmtpd sizes its StreamReader from this attribute: the line limit plus the
        # transparency dot (RFC 5321 4.5.3.1.6).
        self.line_length_limit = limits.max_line_length + 1
        self._protocol_state(
            handler, data_size_limit=max_size, hostname=hostname, timeout=limits.idle_timeout,
            tls_context=None if implicit_tls else tls_context, auth_require_tls=not implicit_tls,
            loop=loop)
        self.limits = limits
        self.access = access
        self.users = users
        self.implicit_tls = implicit_tls
        self.gate = gate
        self.auth_limiter = auth_limiter
        self.data_budget = data_budget or DataBudget(max(limits.max_data_memory, max_size))
        self._held = 0
        self.free_space = free_space
        self.queue_usage = queue_usage
        self._started = False
        self._gate_ip: Optional[str] = None
        self._refusal: Optional[str] = None
        self._deadline_handle: Optional[asyncio.TimerHandle] = None
        self._commands = 0
        self._junk = 0
        self._auth_failures = 0
        self._errors = 0
        self._overshoot = 0

    # aiosmtpd keeps these in a class-wide dict that grows on every EHLO; ours never changes
    # (MAIL may carry 50 more octets of parameters, every other command 512).
    command_size_limits = _CommandSizeLimits({"MAIL": 512 + 50, "RCPT": 512})

    def _protocol_state(self, handler: Any, *, data_size_limit: int, hostname: str, timeout: float,
                        tls_context: Optional[ssl.SSLContext], auth_require_tls: bool,
                        loop: Optional[asyncio.AbstractEventLoop]) -> None:
        """What aiosmtpd's SMTP.__init__ sets up for the arguments the relay gives it
        (enable_SMTPUTF8, no PROXY, no call limits, no authenticator), without its work per
        connection that the relay's sessions never use: the command table is looked up per
        command (_CountedCommands) instead of built, the login mechanisms only when asked
        (`_auth_methods`), the handler's hooks from names found once per class, and no
        "Available AUTH mechanisms" text. A test holds it to SMTP.__init__ attribute by
        attribute (tests/security/test_session_setup.py)."""
        self.__ident__ = "routedsl"
        self.loop = loop if loop else aiosmtpd_smtp.make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=self.loop)
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = None if tls_context is None else False   # `tls_context and False`
        self._timeout_duration = timeout
        self._timeout_handle: Optional[asyncio.TimerHandle] = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport: Optional[asyncio.BaseTransport] = None
        self.session = None
        self.envelope = None
        self.transport: Optional[asyncio.BaseTransport] = None
        self._handler_coroutine: Optional[asyncio.Task[None]] = None
        self._auth_require_tls = auth_require_tls
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = aiosmtpd_smtp.login_always_fail
        self._auth_required = False
        self._handle_hooks = {name: getattr(handler, attr) for name, attr in _hooks_of(handler)}
        ehlo_hook = self._handle_hooks.get("EHLO")
        if ehlo_hook is None:
            self._ehlo_hook_ver = None
        else:
            params = len(inspect.signature(ehlo_hook).parameters)
            if params not in (4, 5):
                raise RuntimeError("Unsupported EHLO Hook")
            self._ehlo_hook_ver = "old" if params == 4 else "new"
        self._smtp_methods = _CountedCommands(self)
        self._enforce_call_limit = False

    @property
    def _auth_methods(self) -> dict[str, Any]:
        """aiosmtpd's table of login mechanisms (name -> method), built as SMTP.__init__
        builds it, on demand: the relay's own AUTH never reads it."""
        own = [(n, getattr(self, n)) for n in dir(type(self)) if n.startswith("auth_")]
        table: dict[str, Any] = {}
        for obj, members in ((self, own), (self.event_handler, inspect.getmembers(self.event_handler))):
            for name, method in members:
                if name.startswith("auth_"):
                    mechanism = getattr(method, "__auth_mechanism_name__",
                                        name.replace("auth_", "").replace("__", "-"))
                    table[mechanism] = _AuthMechAttr(method, obj is self)
        return table

    # -- connection life --------------------------------------------------------------
    @property
    def tls_active(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    @property
    def peer_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = not self._started
        self._started = True
        if first:
            peer = transport.get_extra_info("peername")
            ip = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
            self._refusal = self.gate.acquire(ip)
            if self._refusal is None:
                self._gate_ip = ip
            self._deadline_handle = self.loop.call_later(self.limits.session_timeout, self._session_expired)
        super().connection_made(transport)
        if first and self.implicit_tls and self.session is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            self.session.ssl = {"ssl_object": ssl_object, "cipher": transport.get_extra_info("cipher")}

    def connection_lost(self, error: Optional[Exception]) -> None:
        self._release_data()
        if self._gate_ip is not None:
            self.gate.release(self._gate_ip)
            self._gate_ip = None
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
        super().connection_lost(error)
        task = self._handler_coroutine
        if task is None or task.done():
            self._let_go()
        else:   # the session's task still ends (cancelled, it closes its writer): then
            task.add_done_callback(self._let_go)

    def _let_go(self, _task: Any = None) -> None:
        """Drop the references that lead back to this session (its command table, the
        stream writer and reader, the connect callback, its task) once the connection and
        the task are over, so the session is freed at once instead of by the cycle collector:
        with one message per connection, 28 objects of cyclic garbage per connection kept
        the collector busy (its time in a run: 50 -> 10 ms per 3,000 connections)."""
        self._smtp_methods = {}
        self._writer = None
        self._reader = None
        self._client_connected_cb = None
        # a cancelled task keeps its CancelledError, whose frames hold this session;
        # aiosmtpd may still call cancel() on what stands in its place (a second
        # connection_lost after a failed TLS handshake)
        self._handler_coroutine = _ENDED   # type: ignore[assignment]

    def eof_received(self) -> Optional[bool]:
        # aiosmtpd keeps the transport half-open after EOF (the stream protocol's default)
        # and cancels the session. Under uvloop a client that connects and leaves at once
        # sends its EOF before the session task has started, so nothing would ever close
        # that transport: it would hold its connection slot until the idle timeout, and
        # load-balancer health checks would fill `max_connections`. Close it now.
        super().eof_received()
        return False

    async def _handle_client(self) -> None:
        if self._refusal is not None:
            log.warning("refused a connection from %s: %s", self.peer_ip, self._refusal)
            await self.push(self._refusal)
            self.transport.close()
            return
        await super()._handle_client()

    def _say_and_close(self, reply: str) -> None:
        if self.transport is None:
            return
        try:
            self._writer.write(reply.encode("ascii") + b"\r\n")
        except Exception:   # the transport may already be failing; closing is what matters
            pass
        self.transport.close()

    def _timeout_cb(self) -> None:
        log.info("%s: idle or data-rate timeout", self.peer_ip)
        self._say_and_close(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    def _session_expired(self) -> None:
        log.info("%s: session time limit reached", self.peer_ip)
        self._say_and_close(f"421 4.4.2 {self.hostname} Error: session time limit exceeded")

    async def push(self, status: Any) -> None:
        # aiosmtpd's push(), without its two coroutines of StreamWriter.drain() when there is
        # nothing to wait for (the usual case: the reply fits in the socket at once).
        response = status.encode("utf-8") if isinstance(status, str) else status
        writer = self._writer
        writer.write(response + b"\r\n")
        if _mail_log.isEnabledFor(logging.DEBUG):
            _mail_log.debug("%r << %r", self.session.peer, response)
        if (self._paused or self._connection_lost or self._reader.exception() is not None
                or writer.transport.is_closing()):
            await writer.drain()   # waits, or raises as it always did
        if self.transport is None:
            return
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else str(status)
        if not text[:1] in ("4", "5") or text.startswith("421"):
            return
        if text.startswith("452 4.5.3"):
            # Recipients over the limit are expected of big mailings; only a flood counts.
            self._overshoot += 1
            if self._overshoot <= self.limits.max_recipients:
                return
        self._errors += 1
        if self._errors >= self.limits.max_errors:
            log.warning("%s: %d error replies; closing", self.peer_ip, self._errors)
            await self._close_with("421 4.7.0 Error: too many errors")

    async def _close_with(self, reply: str) -> None:
        await self.push(reply)
        if self.transport is not None:
            self.transport.close()

    def _counted(self, name: str, method: Callable, arg: Optional[str]) -> Awaitable[None]:
        """Count the command against the session's limits; the awaitable that runs it (or
        that closes the session). No coroutine of its own: one less per command."""
        self._commands += 1
        if self._commands > self.limits.max_commands:
            log.warning("%s: more than %d commands", self.peer_ip, self.limits.max_commands)
            return self._close_with("421 4.7.0 Error: too many commands in one session")
        if name in JUNK_COMMANDS:
            self._junk += 1
            if self._junk > self.limits.max_junk_commands:
                log.warning("%s: more than %d junk commands", self.peer_ip, self.limits.max_junk_commands)
                return self._close_with("421 4.7.0 Error: too many junk commands")
        return method(arg)

    async def handle_exception(self, error: Exception) -> str:
        try:
            if isinstance(error, TLSSetupException):
                log.info("%s: TLS handshake failed: %r", self.peer_ip, error.__cause__)
            else:
                log.error("%s: internal error in the SMTP session; answered 451", self.peer_ip, exc_info=error)
                self._set_rset_state()
        except Exception:   # never let the error path itself produce aiosmtpd's "500 (text)"
            pass
        return INTERNAL_ERROR

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        if not self.session.host_name:
            await self.push(f"503 5.5.1 Error: send {helo} first")
            return True
        return False

    # -- greeting commands -------------------------------------------------------------
    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        refusal = hygiene.check_helo(hostname)
        if refusal is not None:
            await self.push(refusal.reply.replace("EHLO", "HELO"))
            return
        await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        refusal = hygiene.check_helo(hostname)
        if refusal is not None:
            await self.push(refusal.reply)
            return
        self._set_rset_state()
        self.session.extended_smtp = True
        self.session.host_name = hostname
        response = [f"250-{self.hostname}", f"250-SIZE {self.data_size_limit}", "250-8BITMIME",
                    "250-SMTPUTF8", "250-PIPELINING"]
        if self.tls_context is not None and not self.tls_active:
            response.append("250-STARTTLS")
        if self.users is not None and self.tls_active:
            response.append("250-AUTH LOGIN PLAIN")
        response.append("250 HELP")
        if self._ehlo_hook_ver == "new":
            response = await self._call_handler_hook("EHLO", hostname, response)
        await self.push("\r\n".join(response))   # one write for the whole reply, not one per line

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
        elif self.tls_active:
            await self.push("554 5.5.1 Error: TLS already active")
        elif self.tls_context is None:
            await self.push("502 5.5.1 Error: STARTTLS not available")
        elif not self.session.host_name:
            await self.push("503 5.5.1 Error: send EHLO first")
        else:
            await super().smtp_STARTTLS(arg)

    # -- AUTH ------------------------------------------------------------------------
    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        words = (arg or "").split()
        if not self.session.extended_smtp:
            await self.push("503 5.5.1 Error: send EHLO first")
        elif self.users is None:
            await self.push("503 5.5.1 Error: authentication not enabled")
        elif not self.tls_active:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
        elif self.session.authenticated:
            await self.push("503 5.5.1 Error: already authenticated")
        elif self.envelope.mail_from:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
        elif self.auth_limiter.blocked(self.peer_ip):
            log.warning("%s: AUTH refused, too many recent failures from this address", self.peer_ip)
            await self.push("454 4.7.0 Too many failed logins from your address, try again later")
        elif not words or len(words) > 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
        elif words[0].upper() not in ("PLAIN", "LOGIN"):
            await self.push("504 5.5.4 Unrecognized authentication type")
        else:
            mechanism = words[0].upper()
            method = self.auth_PLAIN if mechanism == "PLAIN" else self.auth_LOGIN
            result = await method(self, [mechanism, *words[1:]])
            if result.success:
                self.session.authenticated = True
                self.session.auth_data = result.auth_data
                await self.push("235 2.7.0 Authentication successful")
            elif not result.handled:
                await self.push(result.message or "535 5.7.8 Authentication credentials invalid")

    async def _first_response(self, args: list[str], challenge: str | bytes) -> Optional[bytes]:
        """The initial response given with AUTH, else the answer to `challenge`; None when
        the exchange has already been answered (cancelled, or not base64)."""
        if len(args) == 1:
            blob = await self.challenge_auth(challenge)
            return None if blob is MISSING else blob
        blob = _b64(args[1])
        if blob is None:
            await self.push("501 5.5.2 Can't decode base64")
        return blob

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        blob = await self._first_response(args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._check_login(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        login = await self._first_response(args, self.AuthLoginUsernameChallenge)
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._check_login(login, password)

    async def _check_login(self, login_bytes: bytes, password_bytes: bytes) -> AuthResult:
        try:
            login, password = login_bytes.decode("utf-8"), password_bytes.decode("utf-8")
        except UnicodeDecodeError:
            login, password, ok = login_bytes.decode("utf-8", "replace"), None, False
        else:
            # A slow KDF must not stall every other session: check in a worker thread.
            ok = bool(await asyncio.to_thread(self.users.verify, login, password))
        shown = clean_text(login, 64)
        if ok:
            log.info("%s: authenticated as %r", self.peer_ip, shown)
            return AuthResult(success=True, handled=False, auth_data=Authenticated(login))
        self._auth_failures += 1
        self.auth_limiter.failed(self.peer_ip)
        log.warning("%s: failed login for %r (%d on this connection)", self.peer_ip, shown, self._auth_failures)
        await asyncio.sleep(self.limits.auth_failure_delay)
        if self._auth_failures >= self.limits.max_auth_failures:
            await self._close_with("421 4.7.0 Error: too many failed logins, closing connection")
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False)   # aiosmtpd answers 535 5.7.8

    # -- the transaction ---------------------------------------------------------------
    def _spool_free(self, fresh: bool = False) -> Optional[int]:
        if self.free_space is None:
            return None
        # a probe may keep its reading a while; `probe.fresh()`, when it has one, reads now
        probe = getattr(self.free_space, "fresh", self.free_space) if fresh else self.free_space
        try:
            return probe()
        except OSError:
            return None

    def _queue_full(self, size: int) -> bool:
        if self.queue_usage is None:
            return False
        try:
            count, waiting = self.queue_usage()
        except Exception:
            log.exception("cannot read the queue size; not limiting")
            return False
        full = count >= self.limits.max_queue_messages or (
            self.limits.max_queue_size is not None and waiting + size > self.limits.max_queue_size)
        if full:
            log.error("queue full (%d messages, %d bytes); answered 452", count, waiting)
        return full

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: Optional[str]) -> None:
        if await self.check_helo_needed():
            return
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        rest = self._strip_command_keyword("FROM:", arg or "")
        if rest is None:
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        path = hygiene.parse_path(rest, role="sender", smtputf8=True)
        if isinstance(path, hygiene.Refusal):
            await self.push(path.reply)
            return
        params = hygiene.parse_params(path.params)
        if params and not self.session.extended_smtp:
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address> (parameters need EHLO)")
            return
        smtputf8 = params.pop("SMTPUTF8", False)
        body = params.pop("BODY", "7BIT")
        size = params.pop("SIZE", None)
        if not isinstance(smtputf8, bool):
            await self.push("501 5.5.4 Error: SMTPUTF8 takes no value")
            return
        if path.non_ascii and not smtputf8:
            await self.push("553 5.6.7 Must declare SMTPUTF8 to send unicode address")
            return
        if not isinstance(body, str) or body.upper() not in ("7BIT", "8BITMIME"):
            await self.push("501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME")
            return
        if size is not None and (not isinstance(size, str) or not size.isdigit()):
            await self.push("501 5.5.4 Error: SIZE needs a number")
            return
        if params:
            await self.push("555 5.5.4 MAIL FROM parameters not recognized or not implemented")
            return
        if size is not None and int(size) > self.data_size_limit:
            await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        need = self.limits.reserve_for(self.data_size_limit) + int(size or 0)
        free = self._spool_free()
        if free is not None and free < need:
            free = self._spool_free(fresh=True)   # refuse only on a reading taken now
        if free is not None and free < need:
            log.error("spool free space %d below the reserve; answered 452", free)
            await self.push("452 4.3.1 Insufficient system storage")
            return
        if self._queue_full(int(size or 0)):
            await self.push("452 4.3.1 Insufficient system storage (queue full), try again later")
            return
        address = path.address or "<>"   # aiosmtpd's spelling of the null sender
        options = [p.upper() for p in path.params]
        self.envelope.smtp_utf8 = smtputf8
        status = await self._call_handler_hook("MAIL", address, options)
        if status is MISSING:
            self.envelope.mail_from = address
            self.envelope.mail_options.extend(options)
            status = "250 2.1.0 Ok"
        if log.isEnabledFor(logging.DEBUG):   # intake logs the accepted message with its sender
            log.debug("%s: sender %r", self.peer_ip, clean_text(address, 300))
        await self.push(status)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: Optional[str]) -> None:
        if await self.check_helo_needed():
            return
        if not self.envelope.mail_from:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        rest = self._strip_command_keyword("TO:", arg or "")
        if rest is None:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        path = hygiene.parse_path(rest, role="recipient", smtputf8=bool(self.envelope.smtp_utf8))
        if isinstance(path, hygiene.Refusal):
            await self.push(path.reply)
            return
        if path.params:
            await self.push("555 5.5.4 RCPT TO parameters not recognized or not implemented")
            return
        if len(self.envelope.rcpt_tos) >= self.limits.max_recipients:
            await self.push("452 4.5.3 Error: too many recipients")
            return
        login = getattr(self.session.auth_data, "login", None) if self.session.authenticated else None
        if not self.access.may_relay(self.peer_ip, login):
            log.warning("%s: relay denied for %r", self.peer_ip, path.address)
            await self.push(f"554 5.7.1 <{path.address}>: Relay access denied")
            return
        if path.address in self.envelope.rcpt_tos:
            await self.push("250 2.1.5 Ok")   # a duplicate: delivered once
            return
        status = await self._call_handler_hook("RCPT", path.address, [])
        if status is MISSING:
            self.envelope.rcpt_tos.append(path.address)
            status = "250 2.1.5 Ok"
        await self.push(status)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            await self._data_phase()
        finally:
            self._release_data()

    def _release_data(self) -> None:
        if self._held:
            self.data_budget.give(self._held)
            self._held = 0

    async def _data_phase(self) -> None:
        content, problem = await self._read_data()
        if problem is not None:
            self._set_post_data_state()
            await self.push(problem)
            return
        cleaned = hygiene.clean_message(content, hop_limit=self.limits.hop_limit,
                                        max_header_size=self.limits.max_header_size)
        if isinstance(cleaned, hygiene.Refusal):
            log.warning("%s: message refused: %s", self.peer_ip, cleaned.reply)
            self._set_post_data_state()
            await self.push(cleaned.reply)
            return
        self.envelope.content = self.envelope.original_content = cleaned
        try:
            status = await self._call_handler_hook("DATA")
        except OSError as exc:
            log.error("%s: spool error; answered 4xx: %s", self.peer_ip, exc)
            status = ("452 4.3.1 Insufficient system storage" if exc.errno in DISK_FULL_ERRNOS
                      else "451 4.3.0 Error: queue file write error")
        except Exception:
            log.exception("%s: internal error while handing over a message; answered 451", self.peer_ip)
            status = INTERNAL_ERROR
        self._set_post_data_state()
        await self.push("250 2.0.0 OK" if status is MISSING else status)

    async def _read_data(self) -> tuple[bytes, Optional[str]]:
        """Read to `<CRLF>.<CRLF>` (only that ends DATA: RFC 5321 2.3.8), undoing dot-stuffing.

        The time allowed grows with the bytes received (the minimum data rate) but never
        beyond one idle timeout without a complete line; the session deadline still applies.
        Over the size or line limit, the rest is drained to the real end before replying.
        """
        lines: list[bytes] = []
        size, too_much, too_long, busy = 0, False, False, False
        limit, idle, rate = self.data_size_limit, self.limits.idle_timeout, max(1, self.limits.min_data_rate)
        start = self.loop.time()
        self._reset_timeout(idle)
        next_reset = start + 0.25
        in_line = False   # between an overlong line's chunks
        reader = self._reader
        # Lines already in the reader's buffer are taken from it directly: exactly the line
        # readuntil() would return at once (a CRLF found within the reader's limit), without
        # a coroutine per line. Anything else (no complete line yet, an overlong line, the
        # end of the stream) goes through readuntil() as before.
        buffer: bytearray = reader._buffer   # type: ignore[attr-defined]
        line_limit: int = reader._limit   # type: ignore[attr-defined]
        # Better still, all the complete lines in the buffer (up to the end of the data when
        # it is there) are taken as one block when every one of them is within the line
        # limit, the block within the size limit and the memory budget: the block is then
        # exactly what the lines one by one would have given. Otherwise, and for the rest
        # of this message (so the buffer is never scanned again and again), line by line.
        bulk = True
        while True:
            if bulk and buffer and not (in_line or too_much or too_long or busy):
                if buffer.startswith(b".\r\n"):
                    del buffer[:3]
                    break
                stop = buffer.find(b"\r\n.\r\n")
                end = stop + 2 if stop != -1 else buffer.rfind(b"\r\n") + 2
                if end >= 2:
                    block = bytes(buffer[:end])
                    if (size + end <= limit and max(map(len, block.split(b"\r\n"))) <= line_limit
                            and self.data_budget.take(end)):
                        del buffer[:end]
                        size += end
                        self._held += end
                        # undo the dot-stuffing: one dot off each line that starts with one
                        if block.startswith(b"."):
                            block = block[1:]
                        lines.append(block.replace(b"\r\n.", b"\r\n"))
                        now = self.loop.time()
                        if now >= next_reset:
                            next_reset = now + 0.25
                            self._reset_timeout(max(0.001, min(idle, start + idle + size / rate - now)))
                        if stop != -1:
                            del buffer[:3]
                            break
                        continue
                    bulk = False
            end = buffer.find(b"\r\n")
            if end != -1 and end <= line_limit:
                line = bytes(buffer[:end + 2])
                del buffer[:end + 2]   # a bytearray drops its head without copying the rest
            else:
                reader._maybe_resume_transport()   # type: ignore[attr-defined]
                try:
                    line = await reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError as exc:
                    too_long = True
                    lines.clear()
                    self._release_data()
                    chunk = await reader.read(exc.consumed)
                    size += len(chunk)
                    in_line = True
                    continue
                except asyncio.IncompleteReadError:
                    raise ConnectionResetError("connection closed during DATA") from None
            size += len(line)
            now = self.loop.time()
            if now >= next_reset:   # re-arming a timer per line would cost more than the line
                next_reset = now + 0.25
                self._reset_timeout(max(0.001, min(idle, start + idle + size / rate - now)))
            if in_line:
                in_line = False
                continue   # the tail of an overlong line
            if line == b".\r\n":
                break
            if too_much or too_long or busy:
                continue
            if size > limit:
                too_much = True
                lines.clear()
                self._release_data()
                continue
            if not self.data_budget.take(len(line)):
                busy = True
                lines.clear()
                self._release_data()
                continue
            self._held += len(line)
            lines.append(line[1:] if line.startswith(b".") else line)
        reader._maybe_resume_transport()   # type: ignore[attr-defined]
        self._reset_timeout()
        if busy:
            log.warning("%s: message data in memory at its limit (%d bytes); answered 451",
                        self.peer_ip, self.data_budget.limit)
            return b"", "451 4.3.2 System busy, too much mail in transit; try again later"
        if too_long:
            return b"", "500 5.5.2 Error: line too long (RFC 5321 4.5.3.1.6)"
        if too_much:
            return b"", "552 5.3.4 Message size exceeds fixed maximum message size"
        return b"".join(lines), None

    # -- the end ---------------------------------------------------------------------------
    @syntax("QUIT")
    async def smtp_QUIT(self, arg: Optional[str]) -> None:
        if arg:
            await self.push("501 Syntax: QUIT")
            return
        status = await self._call_handler_hook("QUIT")
        await self.push("221 Bye" if status is MISSING else status)
        # aiosmtpd's QUIT cancels the session's own task, so every connection ends with a
        # CancelledError through the command loop (and the traceback and frames it keeps,
        # for the garbage collector). Without a transport the loop simply ends; the
        # connection closes the same way and nothing after QUIT is read.
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # -- no address disclosure --------------------------------------------------------------
    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: Optional[str]) -> None:
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
        else:
            await self.push("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    async def smtp_EXPN(self, arg: Optional[str]) -> None:
        await self.push("502 5.5.1 EXPN not implemented")

    # -- not SMTP ------------------------------------------------------------------------
    async def _not_smtp(self, arg: Optional[str]) -> None:
        log.warning("%s: HTTP request on the SMTP port; closing", self.peer_ip)
        await self._close_with("502 5.7.0 Error: this is an SMTP server, goodbye")

    smtp_GET = smtp_POST = smtp_HEAD = smtp_PUT = smtp_CONNECT = _not_smtp


class _Ended:
    """Stands for a session's task once the task and the connection are over: it is done,
    and cancelling it does nothing (as cancelling a finished task does nothing)."""

    __slots__ = ()

    def done(self) -> bool:
        return True

    def cancel(self, msg: Any = None) -> bool:
        return False


_ENDED = _Ended()


class _Counted:
    """A session's command handler that first counts the command against the session's
    limits. Made when the command is looked up, so it is a slotted object instead of a
    functools.wraps closure; the help text aiosmtpd reads from the method (its
    `__smtp_syntax__` attributes) is looked up on the wrapped method."""

    __slots__ = ("_smtp", "_name", "_method")

    def __init__(self, smtp: RelaySMTP, name: str, method: Callable) -> None:
        self._smtp = smtp
        self._name = name
        self._method = method

    def __call__(self, arg: Optional[str]) -> Awaitable[None]:
        return self._smtp._counted(self._name, self._method, arg)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._method, attr)


class _CountedCommands(Mapping):
    """A session's command table as aiosmtpd reads it (`get` for every command line, `items`
    for HELP): command name -> its `smtp_` method wrapped in _Counted. The names are found
    once per class; the wrapper is made when a command is looked up, so a connection costs
    no table of ~25 bound methods (nor the garbage they leave)."""

    __slots__ = ("_smtp", "_names")

    def __init__(self, smtp: RelaySMTP) -> None:
        self._smtp = smtp
        self._names = _commands_of(type(smtp))

    def get(self, name: str, default: Any = None) -> Any:   # the per-command path: no KeyError
        return self[name] if name in self._names else default

    def __getitem__(self, name: str) -> _Counted:
        return _Counted(self._smtp, name, getattr(self._smtp, self._names[name]))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_COMMANDS: dict[type, dict[str, str]] = {}
_HOOKS: dict[type, tuple[tuple[str, str], ...]] = {}


def _commands_of(cls: type) -> dict[str, str]:
    """command -> `smtp_` attribute, named as SMTP.__init__ names them, once per class."""
    names = _COMMANDS.get(cls)
    if names is None:
        names = _COMMANDS[cls] = {m.replace("smtp_", ""): m for m in dir(cls) if m.startswith("smtp_")}
    return names


def _hooks_of(handler: object) -> tuple[tuple[str, str], ...]:
    """(hook, `handle_` attribute) of a handler, as SMTP.__init__ finds them; for the relay's
    own handler classes once per class, for any other object every time."""
    cls = type(handler)
    hooks = _HOOKS.get(cls)
    if hooks is None:
        hooks = tuple((m.replace("handle_", ""), m) for m in dir(handler) if m.startswith("handle_"))
        if _scan_once(cls):
            _HOOKS[cls] = hooks
    return hooks


def _scan_once(cls: type) -> bool:
    """Classes whose `handle_` members are class attributes only (no per-object ones)."""
    return cls.__module__ == "server.intake"


def _b64(text: str) -> Optional[bytes]:
    import base64
    import binascii
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


# --- listeners ------------------------------------------------------------------------

def make_tls_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later) from PEM files; ListenerError if unusable."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ListenerError(f"cannot use --tls-cert {cert} / --tls-key {key}: {exc}") from None
    return context


def listener_security(config: Any, tls_context: Optional[ssl.SSLContext] = None) -> tuple[Optional[ssl.SSLContext], Any]:
    """The server TLS context (`tls_context`, else one from `tls_cert`/`tls_key`) and the
    users (`users`: a path, or any object with verify(login, password) -> bool) that
    `config` asks for. ListenerError when a PEM file or the users file cannot be used, or
    `listen_tls` has no certificate."""
    from server.users import UserStore, UsersError

    users_path = getattr(config, "users", None)
    try:
        users = users_path if hasattr(users_path, "verify") else UserStore(users_path) if users_path else None
    except UsersError as exc:
        raise ListenerError(str(exc)) from None
    cert, key = getattr(config, "tls_cert", None), getattr(config, "tls_key", None)
    if tls_context is None and cert and key:
        tls_context = make_tls_context(cert, key)
    if getattr(config, "listen_tls", None) is not None and tls_context is None:
        raise ListenerError("--listen-tls needs --tls-cert and --tls-key")
    return tls_context, users


def _binds(address: Any, socks: list[socket.socket]) -> list[dict[str, Any]]:
    """create_server's arguments: one server per given bound socket, or one for the address."""
    if socks:
        return [{"sock": sock} for sock in socks]
    host, port = _host_port(address)
    return [{"host": host, "port": port}]


def _host_port(address: Any) -> tuple[str, int]:
    if hasattr(address, "host"):
        return str(address.host), int(address.port)
    host, port = address
    return str(host), int(port)


FREE_SPACE_TTL = 1.0   # seconds a free-space reading is reused (asked at every MAIL)


def spool_free_space(spool: str | Path, ttl: float = FREE_SPACE_TTL,
                     clock: Callable[[], float] = time.monotonic) -> Callable[[], Optional[int]]:
    """Free bytes for unprivileged writers on the spool's file system (None if unknown).

    The reading is reused for `ttl` seconds: a statvfs per MAIL cost the event loop ~5 %
    of its time under load. `free.fresh()` reads now (the MAIL check asks it before it
    refuses, so space that came back is seen at once). A reading a second old only lets
    a MAIL through; a disk that fills faster still makes the commit fail with a 4xx.
    """
    cache: list[Any] = [None, 0.0]   # [free bytes, when read]

    def fresh() -> Optional[int]:
        path = Path(spool)
        while not path.exists() and path != path.parent:
            path = path.parent
        cache[0], cache[1] = shutil.disk_usage(path).free, clock()
        return cache[0]

    def free() -> Optional[int]:
        if cache[0] is not None and clock() - cache[1] < ttl:
            return cache[0]
        return fresh()
    free.fresh = fresh   # type: ignore[attr-defined]
    return free


async def start_listeners(handler: Any, config: Any, *,
                          free_space: Optional[Callable[[], Optional[int]]] = None,
                          tls_context: Optional[ssl.SSLContext] = None,
                          state: Optional[ListenerState] = None,
                          queue_usage: Optional[Callable[[], tuple[int, int]]] = None,
                          sockets: Optional[tuple[list[socket.socket], list[socket.socket]]] = None,
                          serve: Optional[Callable[..., Any]] = None,
                          ) -> list[asyncio.Server]:
    """Start the SMTP listeners described by `config` (a ServeConfig or anything with its fields):

    `listen` (plain, offering STARTTLS when `tls_cert`/`tls_key` are set), `listen_tls`
    (implicit TLS, optional), `hostname`, `max_size`, `relay_networks`, `users` (path or
    None), `spool` (for the disk reserve), `limits` (a Limits or None for the defaults).
    `free_space` replaces the spool free-space probe (tests); `tls_context` replaces the
    one built from the PEM files. All listeners share one ListenerState (connection gate,
    AUTH limiter, data budget); pass `state` (see `listener_state`) to share or inspect it.
    `queue_usage() -> (messages, bytes)` feeds the queue limits; by default it is read from
    `handler.spool` when that has `len()` and `total_bytes` (server.queue.Spool does).
    `sockets` = (plain, implicit TLS): listen on these already bound sockets (an SMTP intake
    process, server/intake_processes.py) instead of binding `listen`/`listen_tls`; `serve`
    replaces `loop.create_server` (same arguments; returns an object with `close()` and
    `sockets`).
    Raises ListenerError for an unusable configuration, OSError when a port is taken.
    """
    limits = getattr(config, "limits", None) or Limits()
    access = RelayAccess.from_cidrs(getattr(config, "relay_networks", ()) or ())
    tls_context, users = listener_security(config, tls_context)
    listen_tls = getattr(config, "listen_tls", None)
    if users is not None and tls_context is None:
        log.warning("--users without --tls-cert/--tls-key: AUTH is only offered over TLS, so nobody can log in")
    if free_space is None and getattr(config, "spool", None) is not None:
        free_space = spool_free_space(config.spool)
    hostname = getattr(config, "hostname", None) or "localhost"
    max_size = int(getattr(config, "max_size", 35_000_000))
    state = state or listener_state(limits, max_size)
    spool = getattr(handler, "spool", None)
    if queue_usage is None and spool is not None and hasattr(spool, "__len__") and hasattr(spool, "total_bytes"):
        queue_usage = lambda: (len(spool), int(spool.total_bytes))   # noqa: E731
    loop = asyncio.get_running_loop()

    def factory(implicit: bool) -> Callable[[], RelaySMTP]:
        return lambda: RelaySMTP(
            handler, limits=limits, access=access, hostname=hostname, max_size=max_size, gate=state.gate,
            auth_limiter=state.auth_limiter, data_budget=state.data_budget, users=users,
            tls_context=tls_context, implicit_tls=implicit,
            free_space=free_space, queue_usage=queue_usage, loop=loop)

    create = serve or loop.create_server
    servers: list[asyncio.Server] = []
    try:
        plain, implicit = sockets or ([], [])
        for where in _binds(config.listen, plain):
            servers.append(await create(factory(False), **where))
        if listen_tls is not None:
            for where in _binds(listen_tls, implicit):
                servers.append(await create(
                    factory(True), ssl=tls_context, ssl_handshake_timeout=min(30.0, limits.idle_timeout),
                    **where))
    except BaseException:
        for server in servers:
            server.close()
        raise
    for server in servers:
        for sock in server.sockets:
            log.info("listening on %s", sock.getsockname()[:2])
    return servers
