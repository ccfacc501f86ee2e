"""Helpers for the queue tests: a tiny route table, a running scheduler, polling with a deadline."""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping

from routedsl.table import Decision, EngineSpec, RuleRef
from tests.support.poll import until  # noqa: F401 (used by the queue tests)
from server.engines.base import EngineContext, build_engine
from server.queue import Spool
from server.scheduler import DeliveryConfig, Scheduler
from server.snapshot import Snapshot


@dataclass
class Table:
    """The smallest table the scheduler needs: a default plan, plus plans per recipient domain."""
    default: tuple[str, ...]
    by_domain: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    version: str = "0123456789ab"
    needs_mx: bool = False

    def plan(self, recipient: str, sender: str = "", size: int = 0, mx: tuple[str, ...] = ()) -> Decision:
        domain = recipient.rpartition("@")[2].lower()
        if domain in self.by_domain:
            line = 10 + sorted(self.by_domain).index(domain)
            return Decision(self.by_domain[domain], RuleRef("routes.rules", line, f"to {domain} use ..."))
        return Decision(self.default, None)


def smarthost(name: str, port: int, ctx: EngineContext, **options):
    spec = EngineSpec(name=name, kind="smtp", host="127.0.0.1", port=port, tls="none",
                      timeout=5.0, **options)
    return build_engine(spec, None, ctx)


MESSAGE = (b"From: alice@home.test\r\nTo: bob@ok.test\r\nSubject: test\r\n"
           b"Message-ID: <m1@home.test>\r\n\r\nhello\r\n")


@contextlib.asynccontextmanager
async def running(root: Path, table: Table, engines: Mapping[str, object], *,
                  clock: Callable[[], float] = time.time, **config) -> AsyncIterator[tuple[Scheduler, Spool]]:
    """A spool and a scheduler running in this loop over `engines`; everything stopped after."""
    spool = Spool(root)
    spool.open()
    snap = Snapshot(table, dict(engines), table.version, time.time())
    options = dict(hostname="relay.test", min_backoff=0.05, max_backoff=0.2,
                   queue_lifetime=60.0, delay_warning=3600.0, control_interval=0.05)
    options.update(config)
    sched = Scheduler(spool, lambda: snap, DeliveryConfig(**options), clock=clock)
    task = asyncio.create_task(sched.run())
    try:
        yield sched, spool
    finally:
        await asyncio.wait_for(sched.stop(), 10)
        await asyncio.wait_for(task, 10)
        for engine in engines.values():
            close = getattr(engine, "aclose", None)
            if close is not None:
                await close()
        spool.close()
