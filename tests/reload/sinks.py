"""A recording SMTP sink on the test's own event loop (aiosmtpd, loopback, port 0).

Small on purpose: the reload tests only need to know which sink got which message, and
when. Each message is recorded with its Message-ID and the monotonic time it arrived.
"""
from __future__ import annotations

import asyncio
import email
import time
from dataclasses import dataclass

from aiosmtpd.smtp import SMTP


@dataclass(frozen=True)
class Arrival:
    message_id: str
    recipients: tuple[str, ...]
    at: float                  # time.monotonic() when the sink answered 250


class _Recorder:
    def __init__(self, sink: "Sink") -> None:
        self.sink = sink

    async def handle_DATA(self, server, session, envelope) -> str:
        if self.sink.hold is not None:   # a test holds the reply to the final dot
            self.sink.held += 1
            await self.sink.hold.wait()
        parsed = email.message_from_bytes(envelope.original_content or b"")
        self.sink.arrivals.append(Arrival(str(parsed.get("Message-ID", "")),
                                          tuple(envelope.rcpt_tos), time.monotonic()))
        return "250 2.0.0 Ok"


class _CountingSMTP(SMTP):
    """aiosmtpd's SMTP, counting the sink's open connections."""

    def __init__(self, sink: "Sink", *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink

    def connection_made(self, transport) -> None:
        self._sink.connections += 1
        super().connection_made(transport)

    def connection_lost(self, exc) -> None:
        self._sink.connections -= 1
        super().connection_lost(exc)


class Sink:
    """`async with Sink("name") as sink:` — listens on 127.0.0.1:`sink.port`.

    `connections` is the number of open client connections; set `hold` to an
    asyncio.Event to keep every DATA reply back until it is set (`held` counts them).
    """

    def __init__(self, name: str, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.port = 0
        self.arrivals: list[Arrival] = []
        self.connections = 0
        self.hold: asyncio.Event | None = None
        self.held = 0
        self._server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def ids(self) -> set[str]:
        return {a.message_id for a in self.arrivals}

    async def __aenter__(self) -> "Sink":
        loop = asyncio.get_running_loop()
        handler = _Recorder(self)
        self._server = await loop.create_server(
            lambda: _CountingSMTP(self, handler, hostname=f"{self.name}.test", loop=loop),
            self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
