"""The delivery loop: due messages -> plan per recipient -> group by plan -> engines in order.

Owns *when* and *in what order* a message is tried, and what happens after: it takes due
messages from the spool, takes ONE Snapshot per attempt, asks the table for each pending
recipient's plan (`table.plan(recipient, sender, size, mx)`), groups recipients that share
a plan into one transaction, walks each plan's engines in order and turns the outcomes
into queue state: delivered -> done; a destination verdict (`Outcome.final`) -> failed and
bounced; otherwise the next engine with the recipients still waiting. When a plan is
exhausted: deferred with backoff if any engine failed temporarily, bounced if every engine
failed permanently or the queue lifetime has passed. One "delayed" notice goes out after
`delay_warning`.

Every state change is written to the spool (durably) before the next step acts on it.
Bounces are committed *before* the recipients are recorded as failed (a crash in between
can duplicate a bounce, never lose one). A bounce never goes to the null sender (logged
"discarded") and a bounce or notice is never bounced.

It never speaks SMTP and never interprets a failure: engines return Outcomes, and
server/outcome.py owns what they mean. Concurrency is bounded by `DeliveryConfig.concurrency`
messages in flight; an engine bounds its own connections. A smarthost engine that failed as a
whole (no connection, no greeting, TLS, timeout, 421) is skipped for min(min_backoff, 60 s),
as Postfix keeps dead hosts aside: later messages fail over at once instead of each waiting
for the same timeout.

One log line per engine attempt (logger routedsl.scheduler):
    QUEUEID to=<a@x>,<b@y> engine=NAME rule=FILE:LINE|default order rules=VERSION
            result=delivered|temporary|permanent|final reply="..." duration=0.123s
"""
from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from routedsl.values import domain_of
from server import outcome as policy
from server.backoff import next_delay
from server.bounce import (RecipientReport, build_notice, enhanced_status, may_notify,
                           needs_smtputf8)
from server.engines.base import Envelope
from server.queue import (ControlRequest, CorruptMessage, QueuedMessage,
                          RecipientState, Spool, header_section)

if TYPE_CHECKING:
    from server.engines.base import EngineContext
    from server.outcome import Outcome
    from server.snapshot import Snapshot

log = logging.getLogger("routedsl.scheduler")


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    hostname: str
    min_backoff: float = 300.0
    max_backoff: float = 3600.0
    queue_lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    mx_context: Optional["EngineContext"] = None
    concurrency: int = 100            # messages in flight at once
    control_interval: float = 0.5     # how often `routedsl queue` requests are picked up


@dataclass(frozen=True, slots=True)
class _Walk:
    """How one recipient's plan ended in this attempt."""
    address: str
    delivered: bool = False
    final: bool = False               # a destination verdict: bounce now
    temporary: bool = False           # some engine failed temporarily: worth a retry


class Scheduler:
    """Delivers what the spool holds. `run()` until `stop()`; `wake()` / `retry()` from outside."""

    def __init__(self, spool: Spool, snapshot: Callable[[], "Snapshot"], config: DeliveryConfig,
                 *, clock: Callable[[], float] = time.time,
                 rng: Optional[random.Random] = None) -> None:
        self.spool = spool
        self._snapshot = snapshot
        self.config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._deleted: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._kick = asyncio.Event()
        self._stopping = False
        self._running = False
        self._stopped = asyncio.Event()
        self._slots = asyncio.Semaphore(max(1, config.concurrency))
        self._attempt_snaps: dict[str, "Snapshot"] = {}   # the snapshot each attempt in flight uses
        self._attempt_ended = asyncio.Event()
        # smarthost engines that just failed as a whole: engine object id -> (until, outcome)
        self._cooling: dict[int, tuple[float, "Outcome"]] = {}

    # ---------------------------------------------------------------- outside API

    def wake(self, msg: QueuedMessage) -> None:
        """A newly accepted message: deliver it at once."""
        self._schedule(msg.id, 0.0)

    def retry(self, qid: Optional[str] = None) -> int:
        """Make one message (or every message, qid None) due now. Returns how many."""
        ids = [qid] if qid is not None else [m.id for m in self.spool.messages()]
        count = 0
        for i in ids:
            if self.spool.get(i) is None:
                continue
            self.spool.set_schedule(i, self._clock())
            self._schedule(i, 0.0)
            count += 1
        return count

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def drained(self, snapshot: "Snapshot") -> None:
        """Return once no attempt in flight uses `snapshot`.

        A reload may await this before retiring the engines only the old snapshot had, so an
        attempt that started with them can still walk the rest of its plan.
        """
        while any(s is snapshot for s in self._attempt_snaps.values()):
            await self._attempt_ended.wait()

    async def run(self) -> None:
        self._running = True
        self._stopped.clear()
        for msg in self.spool.messages():
            if msg.id not in self._due:
                self._schedule(msg.id, self.spool.state(msg.id).next_attempt)
        control = asyncio.create_task(self._control_loop(), name="queue-control")
        try:
            while not self._stopping:
                self._kick.clear()
                await self._start_due()
                if self._stopping:
                    break
                wait = 1.0
                if self._heap:
                    wait = min(wait, max(0.0, self._heap[0][0] - self._clock()))
                try:
                    await asyncio.wait_for(self._kick.wait(), wait)
                except asyncio.TimeoutError:
                    pass
        finally:
            control.cancel()
            await asyncio.gather(control, return_exceptions=True)
            # graceful: let attempts in flight finish (the caller bounds this with a timeout)
            if self._inflight:
                await asyncio.gather(*self._inflight.values(), return_exceptions=True)
            self._running = False
            self._stopped.set()

    async def stop(self) -> None:
        """Stop taking new work and wait for attempts in flight to finish."""
        self._stopping = True
        self._kick.set()
        if self._running:
            await self._stopped.wait()

    # ---------------------------------------------------------------- the due list

    def _schedule(self, qid: str, when: float) -> None:
        if qid in self._inflight:
            if when <= self._clock():
                self._again.add(qid)
            return
        self._due[qid] = when
        heapq.heappush(self._heap, (when, qid))
        self._kick.set()

    async def _start_due(self) -> None:
        while self._heap and not self._stopping:
            when, qid = self._heap[0]
            if self._due.get(qid) != when:
                heapq.heappop(self._heap)          # superseded by a later _schedule
                continue
            if when > self._clock():
                return
            heapq.heappop(self._heap)
            del self._due[qid]
            if self.spool.get(qid) is None:
                continue
            await self._slots.acquire()            # bounded: wait for a free slot
            if self._stopping:
                self._slots.release()
                self._due[qid] = when              # not started: left for the next start
                return
            task = asyncio.create_task(self._run_attempt(qid), name=f"deliver-{qid}")
            self._inflight[qid] = task

    async def _run_attempt(self, qid: str) -> None:
        retry_at: Optional[float] = None
        try:
            await self._attempt(qid)
        except asyncio.CancelledError:
            raise
        except CorruptMessage as exc:
            log.error("%s: %s", qid, exc)
        except Exception:
            # e.g. the disk is full while recording state: keep the message, try again later
            log.exception("%s: delivery attempt failed; the message stays queued", qid)
            retry_at = self._clock() + self.config.min_backoff
        finally:
            self._inflight.pop(qid, None)
            self._locks.pop(qid, None)
            self._slots.release()
            if self._attempt_snaps.pop(qid, None) is not None:
                ended, self._attempt_ended = self._attempt_ended, asyncio.Event()
                ended.set()
        if qid in self._deleted:
            self._deleted.discard(qid)
            if self.spool.get(qid) is not None:
                await self.spool.finish(qid)
                log.warning("%s: deleted by the operator", qid)
            self._again.discard(qid)
            return
        if self.spool.get(qid) is None:
            self._again.discard(qid)
            return
        if qid in self._again:
            self._again.discard(qid)
            self._schedule(qid, 0.0)
        elif retry_at is not None:
            self._schedule(qid, retry_at)
        else:
            self._schedule(qid, self.spool.state(qid).next_attempt)

    # ---------------------------------------------------------------- one attempt

    async def _attempt(self, qid: str) -> None:
        msg = self.spool.get(qid)
        if msg is None:
            return
        state = self.spool.state(qid)
        pending = state.pending
        if not pending:
            await self.spool.finish(qid)
            return
        data = await self.spool.load(qid)
        snap = self._snapshot()                         # ONE snapshot for the whole attempt
        self._attempt_snaps[qid] = snap
        self._locks[qid] = asyncio.Lock()
        groups = await self._plan(snap, msg, pending)
        if len(groups) == 1:
            # the usual case: one plan for every recipient, walked in this task (no task to start)
            ((engines, (rcpts, rules)),) = groups.items()
            results = await self._walk(snap, msg, data, engines, rcpts, rules, True)
        else:
            # a TaskGroup: if one group's step fails (e.g. its state cannot be written), the
            # other groups are cancelled too, so no walk outlives the attempt a retry repeats
            async with asyncio.TaskGroup() as tg:
                walks = [tg.create_task(self._walk(snap, msg, data, engines, rcpts, rules, False))
                         for engines, (rcpts, rules) in groups.items()]
            results = [w for task in walks for w in task.result()]
        await self._conclude(msg, data, results)

    async def _plan(self, snap: "Snapshot", msg: QueuedMessage, pending: Sequence[str]
                    ) -> dict[tuple[str, ...], tuple[list[str], list[str]]]:
        """Group pending recipients by plan: {engines: (recipients, deciding rules)}."""
        table = snap.table
        mx_cache: dict[str, tuple[str, ...]] = {}
        groups: dict[tuple[str, ...], tuple[list[str], list[str]]] = {}
        look_up_mx = table.needs_mx and self.config.mx_context is not None
        for rcpt in pending:
            mx: tuple[str, ...] = ()
            if look_up_mx:
                domain = domain_of(rcpt)   # the same form the table compares
                if domain not in mx_cache:
                    from server.engines.mx import mx_names
                    mx_cache[domain] = await mx_names(domain, self.config.mx_context)
                mx = mx_cache[domain]
            try:
                decision = table.plan(rcpt, msg.sender, msg.size, mx)
            except Exception:
                log.exception("%s: the rules could not plan <%s>; it waits for a retry", msg.id, rcpt)
                decision = None
            engines = tuple(decision.engines) if decision is not None else ()
            rule = "default order"
            if decision is not None and decision.rule is not None:
                rule = f"{decision.rule.file}:{decision.rule.line}"
            rcpts, rules = groups.setdefault(engines, ([], []))
            rcpts.append(rcpt)
            if rule not in rules:
                rules.append(rule)
        return groups

    async def _walk(self, snap: "Snapshot", msg: QueuedMessage, data: bytes,
                    engines: tuple[str, ...], rcpts: list[str], rules: list[str],
                    only_group: bool) -> list[_Walk]:
        """Try the plan's engines in order for one group; record each step before the next."""
        envelope = Envelope(queue_id=msg.id, sender=msg.sender, data=data, smtputf8=msg.smtputf8)
        remaining = list(rcpts)
        done: list[_Walk] = []
        temporary: set[str] = set()
        if not engines:
            outcomes = {r: policy.engine_problem("the rules give no engine for this recipient",
                                                 engine="(none)") for r in remaining}
            await self._record_step(msg, outcomes, False)
            return [_Walk(r, temporary=True) for r in remaining]
        for name in engines:
            if not remaining:
                break
            started = time.monotonic()
            outcomes = await self._deliver_through(snap, name, envelope, remaining)
            duration = time.monotonic() - started
            self._log_attempt(msg, remaining, name, rules, snap, outcomes, duration)
            everything_delivered = only_group and all(o.delivered for o in outcomes.values()) \
                and len(remaining) == len(rcpts) == len(self.spool.state(msg.id).pending)
            # the finish that follows records this; one durable write instead of two
            await self._record_step(msg, outcomes, everything_delivered)
            still: list[str] = []
            for r in remaining:
                o = outcomes[r]
                if o.delivered:
                    done.append(_Walk(r, delivered=True))
                elif o.final:
                    done.append(_Walk(r, final=True))
                else:
                    if o.temporary:
                        temporary.add(r)
                    still.append(r)
            remaining = still
        done += [_Walk(r, temporary=r in temporary) for r in remaining]
        return done

    async def _deliver_through(self, snap: "Snapshot", name: str, envelope: Envelope,
                               recipients: list[str]) -> dict[str, "Outcome"]:
        engine = snap.engines.get(name)
        if engine is None:
            why = f"engine {name} is not in the active rules"
            return {r: policy.engine_problem(why, engine=name) for r in recipients}
        cooling = self._cooling.get(id(engine))
        if cooling is not None:
            until, why = cooling
            now = time.monotonic()
            if now < until:
                skipped = policy.engine_problem(
                    f"not tried for {until - now:.0f}s more: it failed {self._cool_for():.0f}s "
                    f"ago or less ({why.reply})", engine=name, host=why.host,
                    enhanced=why.enhanced or "4.4.1")
                return {r: skipped for r in recipients}
            del self._cooling[id(engine)]
        try:
            got = await engine.deliver(envelope, list(recipients))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # engines never raise; if one does, it is its fault, not the mail's
            got = {r: policy.classify(exc, engine=name, host=None, stage=policy.Stage.LOCAL)
                   for r in recipients}
        outcomes = {r: got.get(r) or policy.engine_problem("the engine gave no outcome", engine=name)
                    for r in recipients}
        self._note_engine_health(engine, outcomes)
        return outcomes

    def _cool_for(self) -> float:
        return min(self.config.min_backoff, 60.0)

    def _note_engine_health(self, engine: object, outcomes: dict[str, "Outcome"]) -> None:
        """Postfix's dead-host list, per smarthost engine: when the engine as a whole failed
        (no connection, no greeting, TLS or timeout: a temporary outcome without an SMTP reply,
        or a 421), skip it for a short while so the next messages go straight to the next
        engine of their plan instead of each waiting for the same failure. Never for the direct
        engine: its failures belong to one destination, not to the engine."""
        spec = getattr(engine, "spec", None)
        if getattr(spec, "kind", None) not in ("smtp", "smtps") or not outcomes:
            return
        first = next(iter(outcomes.values()))
        whole = all(o.temporary and (o.code is None or o.code == 421) for o in outcomes.values())
        if whole:
            self._cooling[id(engine)] = (time.monotonic() + self._cool_for(), first)
            log.info("engine %s failed as a whole (%s); skipped for %.0fs", first.engine,
                     first.reply, self._cool_for())

    async def _record_step(self, msg: QueuedMessage, outcomes: dict[str, "Outcome"],
                           skip_write: bool) -> None:
        if skip_write:
            # everything delivered in the only group: the finish that follows records it,
            # and nothing reads this step's state (building it cost ~10 us a message)
            return
        async with self._locks[msg.id]:
            cur = self.spool.state(msg.id)
            changed = []
            for r, o in outcomes.items():
                rs = cur.recipient(r).with_reply(o.engine, o.reply, o.enhanced, o.host)
                if o.delivered:
                    rs = dataclasses.replace(rs, status="delivered")
                changed.append(rs)
            if any(o.delivered or o.final for o in outcomes.values()):
                await self.spool.record(cur.update(changed))
            else:
                # Temporary failures only: after a crash the message is simply tried again
                # from its last durable state, so this step needs no fsync of its own; the
                # deferral (or the finish) that ends the attempt writes it with the rest.
                # With a dead first engine that is one durable write less per message.
                self.spool.note(cur.update(changed))

    async def _conclude(self, msg: QueuedMessage, data: bytes, results: list[_Walk]) -> None:
        if all(w.delivered for w in results):
            await self.spool.finish(msg.id)   # the usual case: nothing failed, nothing waits
            return
        now = self._clock()
        cfg = self.config
        state = self.spool.state(msg.id)
        expired = now - state.first_arrival >= cfg.queue_lifetime
        failing: list[RecipientState] = []
        deferred: list[RecipientState] = []
        for w in results:
            if w.delivered:
                continue
            rs = state.recipient(w.address)
            if w.final or not w.temporary or expired:
                failing.append(rs)
            else:
                deferred.append(rs)
        headers = header_section(data[:256 * 1024])

        if failing:
            reports = [RecipientReport(
                rs.address,
                enhanced_status(rs.status_code, "4.4.7" if expired else "5.0.0"),
                rs.last_reply, rs.remote, rs.replies) for rs in failing]
            if expired and any(not w.final and w.temporary for w in results if not w.delivered):
                log.info("%s: queue lifetime passed (%.0fs); giving up", msg.id, now - state.first_arrival)
            await self._notify(msg, "failed", headers, reports, now)
            async with self._locks[msg.id]:
                cur = self.spool.state(msg.id)
                await self.spool.record(cur.update(
                    [dataclasses.replace(cur.recipient(rs.address), status="failed") for rs in failing]))

        if not deferred:
            await self.spool.finish(msg.id)
            return
        async with self._locks[msg.id]:
            cur = self.spool.state(msg.id)
            attempts = cur.attempts + 1
            next_at = now + next_delay(attempts, cfg.min_backoff, cfg.max_backoff, self._rng)
            notified = cur.delay_notified
            if not notified and now - cur.first_arrival >= cfg.delay_warning:
                reports = [RecipientReport(rs.address, enhanced_status(rs.status_code, "4.0.0"),
                                           rs.last_reply, rs.remote, rs.replies) for rs in deferred]
                await self._notify(msg, "delayed", headers, reports, now,
                                   retry_until=cur.first_arrival + cfg.queue_lifetime)
                notified = True
            await self.spool.record(dataclasses.replace(
                cur, attempts=attempts, next_attempt=next_at, delay_notified=notified))
        log.info("%s: deferred %s until %s (attempt %d)", msg.id,
                 ",".join(f"<{rs.address}>" for rs in deferred),
                 time.strftime("%H:%M:%S", time.localtime(next_at)), attempts)

    async def _notify(self, msg: QueuedMessage, notice: str, headers: bytes,
                      reports: list[RecipientReport], now: float,
                      retry_until: Optional[float] = None) -> None:
        """Commit a bounce or delay notice for msg's sender (before the state says so)."""
        who = ",".join(f"<{r.address}>" for r in reports)
        if not may_notify(msg):
            why = "null sender" if msg.sender == "" else f"it is a {msg.kind} notice itself"
            if notice == "failed":
                log.warning("%s: %s failed; no bounce (%s): discarded", msg.id, who, why)
            return
        raw = build_notice(notice=notice, msg=msg, headers=headers, reports=reports,  # type: ignore[arg-type]
                           hostname=self.config.hostname, now=now, retry_until=retry_until)
        kind = "bounce" if notice == "failed" else "delay"
        note = await self.spool.accept("", [msg.sender], raw, kind=kind,
                                       smtputf8=needs_smtputf8(msg))
        log.info("%s: %s notice %s to <%s> for %s", msg.id, notice, note.id, msg.sender, who)
        self.wake(note)

    def _log_attempt(self, msg: QueuedMessage, rcpts: Sequence[str], engine: str,
                     rules: Sequence[str], snap: "Snapshot", outcomes: dict[str, "Outcome"],
                     duration: float) -> None:
        def result(o: "Outcome") -> str:
            return "delivered" if o.delivered else "final" if o.final else o.kind.value

        distinct = {(result(o), o.reply) for o in outcomes.values()}
        if len(distinct) == 1:
            res, reply = next(iter(distinct))
            detail = f'result={res} reply="{reply}"'
        else:
            detail = " ".join(f'<{r}>: result={result(o)} reply="{o.reply}"' for r, o in outcomes.items())
        log.info("%s to=%s engine=%s rule=%s rules=%s %s duration=%.3fs", msg.id,
                 ",".join(f"<{r}>" for r in rcpts), engine, ",".join(rules),
                 snap.version, detail, duration)

    # ---------------------------------------------------------------- control requests

    async def _control_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.control_interval)
            try:
                requests = await self.spool.take_requests()
                for req in requests:
                    ok, text = await self._act(req)
                    await self.spool.answer_async(req, ok, text)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not handle a queue control request")

    async def _act(self, req: ControlRequest) -> tuple[bool, str]:
        if req.op == "retry":
            if req.id is None:
                n = self.retry(None)
                log.info("retry of every message requested: %d message(s)", n)
                return True, f"{n} message(s) scheduled for delivery now"
            if self.retry(req.id):
                log.info("%s: retry requested", req.id)
                return True, f"{req.id}: scheduled for delivery now"
            return False, f"no message {req.id} in the queue"
        if req.op == "delete":
            qid = req.id
            assert qid is not None
            if self.spool.get(qid) is None:
                return False, f"no message {qid} in the queue"
            if qid in self._inflight:
                self._deleted.add(qid)
                return True, f"{qid}: will be deleted when the delivery attempt in progress ends"
            self._due.pop(qid, None)
            await self.spool.finish(qid)
            log.warning("%s: deleted by the operator", qid)
            return True, f"{qid}: deleted"
        return False, f"unknown request {req.op!r}"
