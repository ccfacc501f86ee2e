"""The smarthost engine: `smtp://` (STARTTLS per the `tls` policy) and `smtps://` (implicit TLS).

Owns the session policy for a named next hop: certificates and host name verified unless
`verify no` (the context's CA file trusted beside the system store), AUTH PLAIN/LOGIN only
over TLS, at most `connections` simultaneous connections, and reuse of idle
authenticated connections (no RSET after a clean transaction, RSET once idle for over a
second; dropped on error or when idle too long; pipelined when the server offers it).

Never looks up MX records, never decides what a reply means (server.outcome), never raises
out of `deliver()`.
"""
from __future__ import annotations

import logging
from typing import Optional

from routedsl.table import EngineSpec
from server.engines.base import (EngineContext, Envelope, PooledEngine, SessionFailed,
                                 SessionPlan, client_tls_context)
from server.outcome import Outcome

log = logging.getLogger("routedsl.engines.smarthost")


class SmarthostEngine(PooledEngine):
    def __init__(self, spec: EngineSpec, secret: Optional[str], ctx: EngineContext) -> None:
        if spec.host is None:
            raise ValueError(f"engine {spec.name} has no host")
        super().__init__(spec, ctx)
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

    async def _deliver(self, envelope: Envelope, rcpts: list[str]) -> dict[str, Outcome]:
        def retry(failed: SessionFailed) -> bool:
            log.info("%s: %s: %s", envelope.queue_id, self.name, failed.outcome.reply)
            return False

        return await self._transaction(self._key, envelope, rcpts, host=self.spec.host or self.name,
                                       plan=lambda: self._plan, retry=retry)
