"""`routedsl serve` with candidate speed-ups applied at start-up, to measure them before
anyone changes the relay.

    python bench/throughput/tuned_serve.py --patches all serve routes.rules --spool DIR ...
    python bench/throughput/run.py --systems routedsl,tuned --tuned-patches all

Each patch stands in for a change proposed in README.md (file, function, what to change);
it is applied by wrapping or replacing one function of the running relay, never by
editing its files. This is a measuring aid, not a way to run the relay: the proposals
belong in the relay's own modules.

Patches:
  quiet-mail-log    drop the INFO line per MAIL command (server/smtp.py smtp_MAIL)
  log-thread        write log lines from a background thread (server/app.py setup_logging)
  smtp-init-cache   aiosmtpd's per-connection member scan done once per class
                    (server/smtp.py RelaySMTP)
  free-space-cache  statvfs of the spool at most once a second (server/smtp.py spool_free_space)
  keep-data         deliver from the bytes just accepted instead of re-reading the spool file
                    (server/queue.py accept/load)
  skip-fresh-rset   no RSET before reusing a connection whose last transaction completed
                    under a second ago (server/engines/smarthost.py _deliver)
  no-disk           a ceiling, not a proposal: the spool writes, fsyncs and removes
                    nothing, so the loop's cost without any spool I/O shows (no durability)
  no-info-log       a ceiling: no INFO lines, so what logging costs shows
  write-in-thread   the committing thread writes every message too, not only large ones
                    (INLINE_WRITE_LIMIT = -1), to compare with writing from the loop
"""

from __future__ import annotations

import inspect
import logging
import logging.handlers
import queue
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PATCHES = ("quiet-mail-log", "log-thread", "smtp-init-cache", "free-space-cache", "keep-data",
           "skip-fresh-rset")
# not in "all": measuring aids, not proposals (no-disk gives up durability to show its cost)
CEILINGS = ("no-disk", "no-info-log", "write-in-thread")


def quiet_mail_log() -> None:
    class DropSenderLine(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return record.msg != "%s: sender %r"
    logging.getLogger("routedsl.smtp").addFilter(DropSenderLine())


def log_thread() -> None:
    import server.app as app
    original = app.setup_logging

    def setup_logging(level: int = logging.INFO) -> None:
        original(level)
        root = logging.getLogger()
        q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        listener = logging.handlers.QueueListener(q, *root.handlers, respect_handler_level=True)
        root.handlers[:] = [logging.handlers.QueueHandler(q)]
        listener.start()
        import atexit
        atexit.register(listener.stop)
    app.setup_logging = setup_logging


class _CachedInspect:
    """Stands in for `inspect` inside aiosmtpd.smtp: getmembers() remembers, per class, which
    names start with auth_ (the only ones aiosmtpd keeps) and binds them to each instance."""

    def __init__(self) -> None:
        self._names: dict[type, list[str]] = {}

    def getmembers(self, obj: object) -> list[tuple[str, object]]:
        names = self._names.get(type(obj))
        if names is None:
            names = [n for n, _ in inspect.getmembers(obj) if n.startswith("auth_")]
            self._names[type(obj)] = names
        return [(n, getattr(obj, n)) for n in names]

    def __getattr__(self, name: str) -> object:
        return getattr(inspect, name)


def smtp_init_cache() -> None:
    import aiosmtpd.smtp
    aiosmtpd.smtp.inspect = _CachedInspect()  # type: ignore[assignment]


def free_space_cache() -> None:
    import server.smtp as smtp
    original = smtp.spool_free_space

    def spool_free_space(spool):  # type: ignore[no-untyped-def]
        probe = original(spool)
        cache = [0.0, None]

        def free():  # type: ignore[no-untyped-def]
            now = time.monotonic()
            if now - cache[0] > 1.0:
                cache[1] = probe()
                cache[0] = now
            return cache[1]
        return free
    smtp.spool_free_space = spool_free_space


def keep_data() -> None:
    from server.queue import Spool
    accept, load = Spool._accept, Spool.load
    fresh: dict[str, bytes] = {}

    async def _accept(self, sender, recipients, data, smtputf8, kind):  # type: ignore[no-untyped-def]
        msg = await accept(self, sender, recipients, data, smtputf8, kind)
        fresh[msg.id] = data
        return msg

    async def _load(self, qid):  # type: ignore[no-untyped-def]
        data = fresh.pop(qid, None)
        return data if data is not None else await load(self, qid)
    Spool._accept, Spool.load = _accept, _load  # type: ignore[method-assign]


def skip_fresh_rset() -> None:
    """A completed DATA transaction leaves the session clean (RFC 5321 4.1.1.4), so the RSET
    only checks that the connection still lives; skip it while that is all but certain."""
    import aiosmtplib
    data, rset, mail = aiosmtplib.SMTP.data, aiosmtplib.SMTP.rset, aiosmtplib.SMTP.mail

    async def _data(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = await data(self, *args, **kwargs)
        self._bench_clean_at = time.monotonic()
        return response

    async def _mail(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._bench_clean_at = None
        return await mail(self, *args, **kwargs)

    async def _rset(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        clean_at = getattr(self, "_bench_clean_at", None)
        if clean_at is not None and time.monotonic() - clean_at < 1.0 and self.is_connected:
            return aiosmtplib.SMTPResponse(250, "2.0.0 Ok (not sent)")
        return await rset(self, *args, **kwargs)
    aiosmtplib.SMTP.data, aiosmtplib.SMTP.rset, aiosmtplib.SMTP.mail = _data, _rset, _mail  # type: ignore[method-assign]


def no_disk() -> None:
    """Messages live in memory only: the ceiling of the loop with no spool I/O at all."""
    import asyncio
    import server.queue as q

    async def _accept(self, sender, recipients, data, smtputf8, kind):  # type: ignore[no-untyped-def]
        msg = q.QueuedMessage(id=q.new_queue_id(), sender=sender, recipients=tuple(recipients),
                              size=len(data), arrival=time.time(), smtputf8=smtputf8, kind=kind)
        self._hand_over(msg, data)
        return msg

    async def finish(self, qid):  # type: ignore[no-untyped-def]
        self._forget(qid)

    async def record(self, state):  # type: ignore[no-untyped-def]
        self._states[state.id] = state
        await asyncio.sleep(0)
    q.Spool._accept, q.Spool.finish, q.Spool.record = _accept, finish, record  # type: ignore[method-assign]


def no_info_log() -> None:
    logging.disable(logging.INFO)


def write_in_thread() -> None:
    import server.queue as q
    q.INLINE_WRITE_LIMIT = -1


APPLY = {"no-disk": no_disk, "no-info-log": no_info_log, "write-in-thread": write_in_thread,
         "skip-fresh-rset": skip_fresh_rset, "quiet-mail-log": quiet_mail_log, "log-thread": log_thread,
         "smtp-init-cache": smtp_init_cache, "free-space-cache": free_space_cache,
         "keep-data": keep_data}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--patches":
        print(__doc__, file=sys.stderr)
        return 2
    chosen = list(PATCHES) if argv[1] == "all" else [p for p in argv[1].split(",") if p and p != "none"]
    for name in chosen:
        if name not in APPLY:
            print(f"unknown patch {name!r}; known: {', '.join(PATCHES + CEILINGS)}", file=sys.stderr)
            return 2
        APPLY[name]()
    from routedsl.cli import main as routedsl_main
    return routedsl_main(argv[2:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
