"""Fake SMTP servers for tests: real aiosmtpd sessions in the test's own event loop.

    async with FakeSmtp("127.0.0.2", tls="starttls", auth=("me", "secret")) as sink:
        ...deliver to sink.host, sink.port...
        messages = await sink.wait_for(1)          # polls with a deadline
        assert messages[0].recipients == ["bob@ok.test"]

What it records: every accepted message (`messages`: sender, recipients, data, whether
it came over TLS, the AUTH user), the commands seen (`commands`, e.g. "EHLO", "STARTTLS",
"AUTH PLAIN", "MAIL", "RCPT", "DATA", "RSET", "QUIT"), the number of connections
(`connections`) and the most that were open at once (`peak`).

Fault switches (smtp-sink style), each an action: a reply ("451", "550", "421", "552",
"554" or a full reply text such as "550 5.1.1 no such user"), "drop" (close the connection
without a reply), "stall" (never answer) or "delay SECONDS" (answer normally, but late):

* `fail(command, action, times=None)` for GREETING, EHLO, AUTH, MAIL, RCPT, DATACMD, DATA,
  RSET (DATACMD answers the DATA command itself, before 354; DATA answers after the final
  dot, as a server that refuses the content);
* `fail_local(local_part, action, at="RCPT")` for one recipient's local part, at RCPT or DATA;
* "refuse" (nobody listening) is `unused_port()` or a server that was never started.

TLS: tls="starttls" offers STARTTLS, tls="implicit" speaks TLS from the first byte; the
certificate comes from tests/support/certs.py (pass `ssl_context=` for another one).
AUTH PLAIN/LOGIN checks one user/password; `auth_require_tls` as in aiosmtpd.
`fake_mx_hosts([...])` binds one fake per loopback address on one shared port.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Optional, Sequence

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

from tests.support import certs

REPLIES = {
    "421": "421 4.3.2 Service not available, closing transmission channel",
    "451": "451 4.3.0 Temporary local problem, try again later",
    "452": "452 4.5.3 Too many recipients",
    "550": "550 5.1.1 No such user here",
    "552": "552 5.3.4 Message size exceeds fixed limit",
    "554": "554 5.7.1 Relay access denied",
}
EVIL_REPLY = "550-5.1.1 x\r\n550 5.1.1 \x1b[31mX-Injected: y\rZ"


@dataclass
class Message:
    sender: str                     # '' for the null sender
    recipients: list[str]
    data: bytes
    tls: bool
    user: Optional[str]
    peer: Any = None
    options: list[str] = field(default_factory=list)
    helo: Optional[str] = None

    def header(self, name: str) -> Optional[str]:
        import email
        return email.message_from_bytes(self.data).get(name)


def unused_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (for "connection refused")."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Fault:
    def __init__(self, action: str, times: Optional[int]) -> None:
        self.action = action
        self.times = times

    def take(self) -> Optional[str]:
        if self.times is not None:
            if self.times <= 0:
                return None
            self.times -= 1
        return self.action


class _Greeter(asyncio.Protocol):
    """A connection whose greeting is a fault: reply and close, close, or say nothing."""

    def __init__(self, fake: "FakeSmtp", action: str) -> None:
        self.fake, self.action = fake, action

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.fake._transports.add(transport)
        if self.action == "stall":
            return
        if self.action != "drop":
            transport.write((REPLIES.get(self.action, self.action) + "\r\n").encode())  # type: ignore[attr-defined]
        transport.close()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.fake._transports.discard(self.transport)


class _Session(SMTP):
    """aiosmtpd's SMTP with connection accounting for the fake."""

    def __init__(self, fake: "FakeSmtp", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fake = fake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self.fake._transports.add(transport)
            self._fake_transport = transport

    async def smtp_DATA(self, arg: str) -> None:
        # DATACMD faults answer the DATA command itself, before any 354
        reply = await self.fake._act(self, self.fake._take("DATACMD"))
        if reply is not None:
            await self.push(reply)
            return
        await super().smtp_DATA(arg)

    def connection_lost(self, error: Optional[Exception]) -> None:
        self.fake._active -= 1
        self.fake._transports.discard(getattr(self, "_fake_transport", None))
        super().connection_lost(error)


class FakeSmtp:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 tls: Literal["none", "starttls", "implicit"] = "none",
                 ssl_context: Optional[ssl.SSLContext] = None,
                 auth: Optional[tuple[str, str]] = None,
                 auth_mechanisms: Sequence[str] = ("PLAIN", "LOGIN"),
                 auth_require_tls: bool = True,
                 size: Optional[int] = 33554432,
                 smtputf8: bool = False,
                 hostname: str = "fake.test") -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.ssl_context = ssl_context or (certs.server_context() if tls != "none" else None)
        self.auth = auth
        self.auth_mechanisms = tuple(m.upper() for m in auth_mechanisms)
        self.auth_require_tls = auth_require_tls
        self.size = size
        self.smtputf8 = smtputf8
        self.hostname = hostname
        self.messages: list[Message] = []
        self.commands: list[str] = []
        self.connections = 0
        self.peak = 0
        self._active = 0
        self._faults: dict[str, _Fault] = {}
        self._local_faults: dict[tuple[str, str], _Fault] = {}
        self._server: Optional[asyncio.base_events.Server] = None
        self._transports: set[Any] = set()
        self._stop = asyncio.Event()

    # --- switches ----------------------------------------------------------------------

    def fail(self, command: str, action: str, times: Optional[int] = None) -> None:
        self._faults[command.upper()] = _Fault(action, times)

    def fail_local(self, local_part: str, action: str, at: str = "RCPT",
                   times: Optional[int] = None) -> None:
        self._local_faults[(at.upper(), local_part.lower())] = _Fault(action, times)

    def heal(self) -> None:
        self._faults.clear()
        self._local_faults.clear()

    @property
    def active(self) -> int:
        return self._active

    # --- life cycle --------------------------------------------------------------------

    async def __aenter__(self) -> "FakeSmtp":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._server = await loop.create_server(
            self._factory, self.host, self.port,
            ssl=self.ssl_context if self.tls == "implicit" else None,
            reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
        for transport in list(self._transports):
            transport.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        # closed transports report connection_lost on the next loop iterations
        for _ in range(3):
            await asyncio.sleep(0)
        self._transports.clear()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Message]:
        """Wait until at least `count` messages arrived; fail the test after `timeout`."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} messages at {self.host}:{self.port}, "
                                     f"got {len(self.messages)}")
            await asyncio.sleep(0.01)
        return self.messages

    # --- the server side ---------------------------------------------------------------

    def _factory(self) -> asyncio.Protocol:
        self.connections += 1
        greeting = self._take("GREETING")
        if greeting is not None:
            return _Greeter(self, greeting)
        self._active += 1
        self.peak = max(self.peak, self._active)
        excluded = [m for m in ("PLAIN", "LOGIN") if m not in self.auth_mechanisms]
        return _Session(
            self, _Handler(self),
            loop=asyncio.get_running_loop(),
            hostname=self.hostname,
            data_size_limit=self.size,
            enable_SMTPUTF8=self.smtputf8,
            tls_context=self.ssl_context if self.tls == "starttls" else None,
            authenticator=self._authenticate if self.auth else None,
            auth_require_tls=self.auth_require_tls and self.tls != "implicit",
            auth_exclude_mechanism=excluded,
            timeout=30,
        )

    def _take(self, command: str) -> Optional[str]:
        fault = self._faults.get(command)
        return fault.take() if fault is not None else None

    def _take_local(self, at: str, address: str) -> Optional[str]:
        fault = self._local_faults.get((at, address.rpartition("@")[0].lower()))
        return fault.take() if fault is not None else None

    def _authenticate(self, server: SMTP, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        assert self.auth is not None
        if isinstance(auth_data, LoginPassword):
            user, password = auth_data.login.decode(), auth_data.password.decode()
            if (user, password) == self.auth:
                return AuthResult(success=True, auth_data=user)
        # handled=False: aiosmtpd then answers 535 instead of nothing at all
        return AuthResult(success=False, handled=False)

    async def _act(self, server: SMTP, action: Optional[str]) -> Optional[str]:
        """None: carry on normally; else the reply to send (after drop/stall, never returns)."""
        if action is None:
            return None
        if action.startswith("delay "):  # answer normally, but late
            await asyncio.sleep(float(action.split()[1]))
            return None
        if action == "drop":
            server.transport.close()
            await asyncio.Future()  # cancelled when the connection is gone
        if action == "stall":
            await self._stop.wait()
            server.transport.close()
            await asyncio.Future()
        reply = REPLIES.get(action, action)
        if reply.startswith("421"):
            asyncio.get_running_loop().call_soon(server.transport.close)
        return reply


class _Handler:
    def __init__(self, fake: FakeSmtp) -> None:
        self.fake = fake

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.fake.commands.append("EHLO")
        reply = await self.fake._act(server, self.fake._take("EHLO"))
        if reply is not None:
            return [reply]
        session.host_name = hostname  # with this hook aiosmtpd leaves it to us
        return responses

    def handle_STARTTLS(self, server, session, envelope) -> bool:
        self.fake.commands.append("STARTTLS")
        return True

    async def handle_AUTH(self, server, session, envelope, args):
        self.fake.commands.append("AUTH " + (args[0].upper() if args else ""))
        reply = await self.fake._act(server, self.fake._take("AUTH"))
        return reply if reply is not None else MISSING

    async def handle_MAIL(self, server, session, envelope, address, options):
        self.fake.commands.append("MAIL")
        reply = await self.fake._act(server, self.fake._take("MAIL"))
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, options):
        self.fake.commands.append("RCPT")
        action = self.fake._take_local("RCPT", address) or self.fake._take("RCPT")
        reply = await self.fake._act(server, action)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        self.fake.commands.append("DATA")
        action = None
        for r in envelope.rcpt_tos:
            action = action or self.fake._take_local("DATA", r)
        reply = await self.fake._act(server, action or self.fake._take("DATA"))
        if reply is not None:
            return reply
        self.fake.messages.append(Message(
            sender="" if envelope.mail_from == "<>" else envelope.mail_from,
            recipients=list(envelope.rcpt_tos),
            data=envelope.original_content,
            tls=session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None,
            user=session.auth_data if session.authenticated else None,
            peer=session.peer,
            options=list(envelope.mail_options),
            helo=session.host_name,
        ))
        return "250 2.0.0 Ok: queued"

    async def handle_RSET(self, server, session, envelope):
        self.fake.commands.append("RSET")
        reply = await self.fake._act(server, self.fake._take("RSET"))
        return reply if reply is not None else MISSING

    async def handle_QUIT(self, server, session, envelope):
        self.fake.commands.append("QUIT")
        return MISSING


@contextlib.asynccontextmanager
async def fake_mx_hosts(addresses: Sequence[str], **options: Any) -> AsyncIterator[list[FakeSmtp]]:
    """One FakeSmtp per loopback address, all on the same port (`fakes[0].port`)."""
    last_error: Optional[OSError] = None
    for _ in range(20):
        fakes: list[FakeSmtp] = []
        try:
            port = 0
            for address in addresses:
                fake = FakeSmtp(address, port, **options)
                await fake.start()
                fakes.append(fake)
                port = fake.port
        except OSError as exc:  # the port was taken on another address: start over
            last_error = exc
            for fake in fakes:
                await fake.stop()
            continue
        try:
            yield fakes
        finally:
            for fake in fakes:
                await fake.stop()
        return
    raise RuntimeError(f"could not bind {addresses} on one port: {last_error}")
