"""The direct engine: deliver to the recipient domain's own mail hosts.

Owns the walk over the MX hosts that `mx.resolve()` returns: every host and every address
is tried in order until the recipients are delivered or refused with a destination
verdict (which stops the walk); opportunistic STARTTLS without certificate checks, like
common MTAs, retried once in plaintext on the same address when the handshake fails;
one transaction per recipient domain; idle connections reused per (address, port).

Never verifies certificates, never sends credentials, never decides what a reply means
(server.outcome), never raises out of `deliver()`.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from routedsl.table import EngineSpec
from server import outcome as oc
from server.engines.base import (EngineContext, Envelope, PooledEngine, SessionFailed,
                                 SessionPlan, client_tls_context)
from server.outcome import Outcome

log = logging.getLogger("routedsl.engines.direct")


class DirectEngine(PooledEngine):
    def __init__(self, spec: EngineSpec, ctx: EngineContext) -> None:
        super().__init__(spec, ctx)
        self._tls = client_tls_context(verify=False)

    async def _deliver(self, envelope: Envelope, rcpts: list[str]) -> dict[str, Outcome]:
        by_domain: dict[str, list[str]] = {}
        outcomes: dict[str, Outcome] = {}
        for r in rcpts:
            local, at, domain = r.rpartition("@")
            if not at or not local or not domain:
                outcomes[r] = oc.bad_recipient(r, engine=self.name)
            else:
                by_domain.setdefault(domain.lower().rstrip("."), []).append(r)
        results = await asyncio.gather(*(self._deliver_domain(envelope, d, group)
                                         for d, group in by_domain.items()))
        for result in results:
            outcomes.update(result)
        return outcomes

    async def _deliver_domain(self, envelope: Envelope, domain: str,
                              rcpts: list[str]) -> dict[str, Outcome]:
        from server.engines import mx  # dnspython only for relays that deliver direct
        found = await mx.resolve(domain, self._ctx)
        if found.outcome is not None:
            verdict = replace(found.outcome, engine=self.name)
            return {r: verdict for r in rcpts}

        best: dict[str, Outcome] = {}
        last: dict[str, Outcome] = {}
        pending = list(rcpts)
        tried: set[str] = set()
        for host in found.hosts:
            for address in host.addresses:
                if not pending:
                    break
                if address in tried:  # two MX names for one machine: once is enough
                    continue
                tried.add(address)
                result = await self._attempt(envelope, pending, host.name, address)
                for r, o in result.items():
                    last[r] = o
                    if r not in best or oc.rank(o) > oc.rank(best[r]):
                        best[r] = o
                # a delivery or a destination verdict ends the walk for that recipient
                pending = [r for r in pending if not (result[r].delivered or result[r].final)]
        # The last host's answer counts, except that a temporary failure anywhere earns a
        # retry rather than a bounce from a later host's permanent refusal.
        final: dict[str, Outcome] = {}
        for r in rcpts:
            o = last[r]
            if o.permanent and not o.final and best[r].temporary:
                o = best[r]
            final[r] = o
        return final

    async def _attempt(self, envelope: Envelope, rcpts: list[str], host: str,
                       address: str) -> dict[str, Outcome]:
        """One session to one address of one MX host (reusing an idle one when we can)."""
        plaintext = False

        def plan() -> SessionPlan:
            return SessionPlan(
                engine=self.name, address=address, port=self.spec.port, server_name=host,
                helo=self.spec.helo or self._ctx.hostname, timeout=self.spec.timeout,
                starttls="none" if plaintext or self.spec.tls == "none" else "opportunistic",
                tls_context=self._tls)

        def retry(failed: SessionFailed) -> bool:
            nonlocal plaintext
            if failed.tls_failed and not plaintext:
                log.info("%s: TLS with %s[%s] failed (%s); retrying in plaintext",
                         envelope.queue_id, host, address, failed.outcome.text)
                plaintext = True
                return True
            log.info("%s: %s[%s]: %s", envelope.queue_id, host, address, failed.outcome.reply)
            return False

        return await self._transaction((address, self.spec.port), envelope, rcpts, host=host,
                                       plan=plan, retry=retry)
