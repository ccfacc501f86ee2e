"""Test parts for the security tests: an in-loop relay protocol with a recording handler,
and a raw SMTP client over asyncio streams (bytes go on the wire exactly as given)."""
from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

from tests.support.poll import until  # noqa: F401 (the security tests import it from here)

from server.limits import Limits
from server.smtp import ListenerState, listener_state, start_listeners

_FINAL = re.compile(rb"(?:^|\r\n)\d{3}(?: [^\r\n]*)?\r\n$")


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    peer: str
    login: Optional[str]


@dataclass
class RecordingHandler:
    """Keeps every message the protocol hands over; `fail` makes handle_DATA raise it."""
    messages: list[Received] = field(default_factory=list)
    fail: Optional[BaseException] = None

    async def handle_DATA(self, server, session, envelope) -> str:
        if self.fail is not None:
            raise self.fail
        login = getattr(session.auth_data, "login", None) if session.authenticated else None
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content, session.peer[0], login))
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"


class Client:
    """A raw SMTP client: `cmd(b"EHLO x")` sends one line and returns the whole reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.banner = b""

    @classmethod
    async def connect(cls, port: int, *, host: str = "127.0.0.1", src: str = "127.0.0.1",
                      tls: Optional[ssl.SSLContext] = None, read_banner: bool = True) -> "Client":
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, local_addr=(src, 0), ssl=tls, server_hostname="localhost" if tls else None), 10)
        client = cls(reader, writer)
        if read_banner:
            client.banner = await client.reply()
        return client

    async def reply(self, timeout: float = 10.0) -> bytes:
        """One complete (possibly multi-line) reply, or what came before EOF plus b'<EOF>'."""
        buf = b""
        async def read() -> bytes:
            nonlocal buf
            while not _FINAL.search(buf):
                chunk = await self.reader.read(65536)
                if not chunk:
                    return buf + b"<EOF>"
                buf += chunk
            return buf
        return await asyncio.wait_for(read(), timeout)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: bytes, timeout: float = 10.0) -> bytes:
        await self.send(line + b"\r\n")
        return await self.reply(timeout)

    async def starttls(self, context: ssl.SSLContext) -> None:
        await self.writer.start_tls(context, server_hostname="localhost")

    async def closed(self, timeout: float = 10.0) -> bool:
        """True once the server has closed the connection (all pending bytes read)."""
        async def drain() -> None:
            while await self.reader.read(65536):
                pass
        try:
            await asyncio.wait_for(drain(), timeout)
        except (ConnectionError, ssl.SSLError):
            pass
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (Exception, asyncio.TimeoutError):
            pass


def code(reply: bytes) -> str:
    """'250' / '554 5.7.1' from the last line of a reply."""
    last = reply.rstrip(b"\r\n").split(b"\r\n")[-1].decode("latin-1")
    parts = last[4:].split(" ", 1)
    if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", parts[0] if parts else ""):
        return f"{last[:3]} {parts[0]}"
    return last[:3]


@dataclass
class Relay:
    servers: list[asyncio.Server]
    handler: Any
    state: ListenerState

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]

    @property
    def tls_port(self) -> int:
        return self.servers[1].sockets[0].getsockname()[1]

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            server.close_clients() if hasattr(server, "close_clients") else None
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass


async def start_relay(handler: Any = None, *, limits: Limits | None = None, users: Path | None = None,
                      tls: Optional[ssl.SSLContext] = None, implicit_tls: bool = False,
                      relay_networks: tuple[str, ...] = (), max_size: int = 35_000_000,
                      free_space: Optional[Callable[[], Optional[int]]] = None, host: str = "127.0.0.1",
                      queue_usage: Optional[Callable[[], tuple[int, int]]] = None) -> Relay:
    config = SimpleNamespace(
        listen=(host, 0), listen_tls=(host, 0) if implicit_tls else None, hostname="relay.test",
        max_size=max_size, relay_networks=relay_networks, users=users, tls_cert=None, tls_key=None,
        spool=None, limits=limits or Limits(auth_failure_delay=0.05))
    handler = handler if handler is not None else RecordingHandler()
    state = listener_state(config.limits, max_size)
    servers = await start_listeners(handler, config, free_space=free_space or (lambda: 10**12),
                                    tls_context=tls, state=state, queue_usage=queue_usage)
    return Relay(servers, handler, state)


