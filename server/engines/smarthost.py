"""The smarthost engine: `smtp://` (STARTTLS per the `tls` policy) and `smtps://` (implicit TLS).

Owns the session policy for a named next hop: certificates and host name verified unless
`verify no` (the context's CA file trusted beside the system store), AUTH PLAIN/LOGIN only
over TLS, at most `connections` simultaneous connections, and reuse of idle
authenticated connections (RSET between messages, dropped on error or when idle too long).

Never looks up MX records, never decides what a reply means (server.outcome), never raises
out of `deliver()`.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional, Sequence

from routedsl.table import EngineSpec
from server import outcome as oc
from server.engines.base import (ConnectionPool, EngineContext, Envelope, InFlight,
                                 SessionFailed, SessionPlan, client_tls_context, guarded,
                                 open_session, run_transaction, unique)
from server.outcome import Outcome

log = logging.getLogger("routedsl.engines.smarthost")


class SmarthostEngine:
    def __init__(self, spec: EngineSpec, secret: Optional[str], ctx: EngineContext) -> None:
        if spec.host is None:
            raise ValueError(f"engine {spec.name} has no host")
        self.name = spec.name
        self.spec = spec
        self._ctx = ctx
        implicit = spec.kind == "smtps" or spec.tls == "implicit"
        starttls = "none" if implicit else spec.tls
        if starttls not in ("required", "opportunistic", "none"):
            starttls = "required"
        tls_context = None
        if implicit or starttls != "none":
            tls_context = client_tls_context(verify=spec.verify, ca_file=ctx.ca_file)
        self._plan = SessionPlan(
            engine=spec.name, address=spec.host, port=spec.port, server_name=spec.host,
            helo=spec.helo or ctx.hostname, timeout=spec.timeout, implicit_tls=implicit,
            starttls=starttls,  # type: ignore[arg-type]
            tls_context=tls_context, user=spec.user, password=secret,
        )
        self._key = (spec.host, spec.port)
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
            return await guarded(self.name, rcpts, self._deliver(envelope, rcpts))
        finally:
            self._inflight.leave()

    async def _deliver(self, envelope: Envelope, rcpts: list[str]) -> dict[str, Outcome]:
        spec = self.spec
        size = len(envelope.data)
        if spec.max_size is not None and size > spec.max_size:
            skipped = oc.too_large(size, spec.max_size, engine=self.name, host=spec.host)
            return {r: skipped for r in rcpts}

        while True:
            client = await self._pool.checkout(self._key)
            if client is None:
                try:
                    client = await open_session(self._plan)
                except SessionFailed as failed:
                    self._pool.release_slot()
                    log.info("%s: %s: %s", envelope.queue_id, self.name, failed.outcome.reply)
                    return {r: failed.outcome for r in rcpts}
                except BaseException:
                    self._pool.release_slot()
                    raise
            else:
                # a pooled connection: make sure it is alive and clean before using it
                try:
                    await client.rset(timeout=spec.timeout)
                except asyncio.CancelledError:
                    self._pool.checkin(self._key, client, False)
                    raise
                except Exception:
                    self._pool.checkin(self._key, client, False)
                    continue
            reusable = False
            try:
                outcomes, reusable = await run_transaction(
                    client, envelope, rcpts, engine=self.name, host=spec.host or self.name,
                    timeout=spec.timeout, final_timeout=self._ctx.final_timeout)
            finally:
                self._pool.checkin(self._key, client, reusable)
            return outcomes

    async def aclose(self) -> None:
        await self._inflight.drain()
        await self._pool.aclose()
