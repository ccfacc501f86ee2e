"""Latency probes: numbered messages sent through the relay beside the load, timed both ends.

smtp-sink counts but cannot tell one message from another, so latency from accept to
arrival is measured on a thin stream of probe messages (a few percent of the load) that the
relay routes to a sink of our own, ``probe.test`` -> ProbeSink. The probe client records when
the relay answered 250 to each probe's DATA; the sink records when the probe arrived. Both
run in the benchmark's event loop, so both use the same monotonic clock.
Never: sends anywhere but loopback.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger("routedsl.bench.probe")

PROBE_DOMAIN = "probe.test"
_PROBE_ID = re.compile(rb"^X-Bench-Probe: (\d+)\r?$", re.MULTILINE)


class ProbeSink:
    """An in-loop aiosmtpd server that timestamps each probe by its X-Bench-Probe header."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.arrivals: dict[int, float] = {}
        self._server: asyncio.Server | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        m = _PROBE_ID.search(data)
        if m:
            self.arrivals.setdefault(int(m.group(1)), time.monotonic())
        return "250 2.0.0 probe stored"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="probe-sink.test", ident="probe-sink"), self.host, 0
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Prober:
    """Sends one probe every ``interval`` seconds over a kept-open connection to the relay."""

    def __init__(self, host: str, port: int, interval: float) -> None:
        self.host, self.port, self.interval = host, port, interval
        self.accepted: dict[int, float] = {}
        self.transaction: dict[int, float] = {}   # MAIL FROM .. 250 after DATA, seconds
        self.errors = 0
        self._client: aiosmtplib.SMTP | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _message(self, n: int) -> bytes:
        body = b"probe body line\r\n" * 200            # ~3.5 KB, close to the load's 4 KiB
        return (
            b"From: <probe@source.test>\r\nTo: <p@" + PROBE_DOMAIN.encode() + b">\r\n"
            b"Subject: probe " + str(n).encode() + b"\r\n"
            b"X-Bench-Probe: " + str(n).encode() + b"\r\n\r\n" + body
        )

    async def _run(self) -> None:
        try:
            await self._loop()
        finally:
            if self._client is not None:
                self._client.close()

    async def _loop(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self._stopping:
            client = self._client
            next_at += self.interval
            try:
                if client is None or not client.is_connected:
                    client = aiosmtplib.SMTP(hostname=self.host, port=self.port,
                                             start_tls=False, timeout=30)
                    self._client = client
                    await client.connect()
                n += 1
                began = time.monotonic()
                await client.sendmail("probe@source.test", [f"p@{PROBE_DOMAIN}"], self._message(n))
                self.accepted[n] = time.monotonic()
                self.transaction[n] = self.accepted[n] - began
            except (aiosmtplib.SMTPException, OSError) as exc:
                self.errors += 1
                log.debug("probe %d failed: %s", n, exc)
                if self._client is not None:
                    self._client.close()
                self._client = None
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop(self) -> None:
        """Stop sending. The loop also checks a flag: a client library may turn a
        cancellation into its own error, which the loop would otherwise survive."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            # asyncio.wait never raises the task's own cancellation, but lets ours through
            await asyncio.wait([self._task], timeout=10)


def latencies(prober: Prober, sink: ProbeSink) -> list[float]:
    """Seconds from the relay's 250 to arrival, for every probe that did both."""
    return sorted(
        max(0.0, sink.arrivals[n] - t) for n, t in prober.accepted.items() if n in sink.arrivals
    )
