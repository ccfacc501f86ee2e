"""Hot reload: follow the rules file, and never let a broken file go live.

This module owns watching the rules file and deciding when a new Snapshot replaces the
active one. It watches the *folders* that hold the file (and, for a symlink, every link
on the way to its target, re-resolved after each change) with watchfiles, because
editors save by replacing the file, deploy tools switch symlinks, and people delete and
recreate. watchfiles' blocking `watch` runs in a thread of its own that hands each batch
of changes to the loop: its async form would bring in anyio and its worker threads, about
1 MiB of the relay's memory for one wait. SIGHUP asks for the same reload through
`request()`.

A reload reads the file once (the same bytes are compiled and hashed), waits until it
has been quiet for a short settle time, and retries when (st_ino, st_size, st_mtime_ns)
changed during the read: a half-written file is never compiled as if it were complete.
The text is compiled and its secrets resolved in a worker thread; engines are built on
the loop; unchanged engines are reused. Only then is the new Snapshot handed to
`on_swap` (one reference assignment in the event loop). Replaced engines are closed in
the background, after their deliveries in flight finish.

It never touches the spool except `<spool>/active-rules.json` (through server.status),
never routes mail and never stops the relay: a refused file is logged with the same
`file:line:col` diagnostics as `routedsl check`, and the active version stays.

Log lines (logger "routedsl.reload"):
  rules version V active: E engines, R rules (reason, N ms)           one per accepted reload
  <diagnostics>\\nreload refused; version V stays active              one per refused content
  rules file P is missing; version V stays active                    deleted, not yet back
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Coroutine, Optional

from routedsl.compile import version_of
from server.snapshot import (ReloadRefused, Snapshot, assemble, decode_rules, prepare,
                             retired_engines)

if TYPE_CHECKING:
    from server.engines.base import EngineContext

log = logging.getLogger("routedsl.reload")

Fingerprint = tuple[int, int, int, int]   # (st_dev, st_ino, st_size, st_mtime_ns)


@dataclass(frozen=True)
class ReloadResult:
    """What one reload did. `version` is the version active afterwards."""
    accepted: bool          # the file was valid (whether or not it differed)
    swapped: bool           # a new Snapshot went live
    version: str
    reason: str
    detail: str = ""        # the rendered diagnostics or the problem, when refused
    seconds: float = 0.0


class FileUnstable(Exception):
    """The file kept changing while it was read; a later event will bring it back."""


def read_stable(path: str | os.PathLike[str], settle: float = 0.05,
                deadline: float = 3.0) -> tuple[bytes, Fingerprint]:
    """Read the whole file once it has been quiet for `settle` seconds (blocking).

    "Quiet" means its mtime is at least `settle` old, and the path names the same inode
    with the same size and mtime before and after the read. Raises FileNotFoundError,
    OSError, or FileUnstable when it is still changing after `deadline` seconds.
    """
    give_up = time.monotonic() + deadline
    while True:
        before = _fingerprint(os.stat(path))
        age = time.time() - before[3] / 1e9
        if 0 <= age < settle:
            # Written moments ago: an editor or `cp` may still be writing the rest.
            _pause(settle - age, give_up)
            continue
        with open(path, "rb") as handle:
            data = handle.read()
            during = _fingerprint(os.fstat(handle.fileno()))
        after = _fingerprint(os.stat(path))
        if before == during == after and len(data) == before[2]:
            return data, after
        _pause(min(settle, 0.05), give_up)


def _pause(seconds: float, give_up: float) -> None:
    if time.monotonic() + seconds > give_up:
        raise FileUnstable("the rules file kept changing while it was read")
    time.sleep(max(seconds, 0.001))


def _fingerprint(st: os.stat_result) -> Fingerprint:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _stat_or_none(path: Path) -> Optional[Fingerprint]:
    try:
        return _fingerprint(os.stat(path))
    except OSError:
        return None


def _norm(path: str) -> str:
    """Resolve a path's folders but not its last component (that may be a symlink)."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(head), tail)


def resolution_chain(path: Path) -> tuple[frozenset[str], frozenset[str]]:
    """The paths whose change can change what `path` reads, and the folders holding them.

    For a plain file that is the file itself. For a symlink it is every link on the way
    (including symlinked folders such as `..data` in config-map style deployments) and
    the final target.
    """
    names: set[str] = set()
    pending = [os.path.abspath(path)]
    seen = 0
    while pending and seen < 40:
        seen += 1
        current = pending.pop()
        normal = _norm(current)
        names.add(normal)
        # Symlinked folders on the way (relative to the last real folder we know).
        head = os.path.dirname(current)
        while head and head != os.path.dirname(head):
            if os.path.islink(head):
                names.add(_norm(head))
            head = os.path.dirname(head)
        if os.path.islink(current):
            try:
                target = os.readlink(current)
            except OSError:
                break
            pending.append(os.path.join(os.path.dirname(current), target))
    real = os.path.realpath(path)
    names.add(_norm(real))
    folders = {os.path.dirname(name) for name in names}
    folders = {folder for folder in folders if os.path.isdir(folder)}
    return frozenset(names), frozenset(folders)


async def load_snapshot(path: str | os.PathLike[str], ctx: "EngineContext") -> Snapshot:
    """The start-up Snapshot, read and decoded exactly as every later reload reads it.

    Raises OSError (missing/unreadable file), FileUnstable, or ReloadRefused (`.text`:
    the diagnostics as `routedsl check` renders them).
    """
    data, _ = await asyncio.to_thread(read_stable, path, 0.0)
    # Compiled on the loop's own thread, which serves nothing yet: in a worker thread the
    # compile's short-lived objects stayed in that thread's malloc arena for good (1.5 MiB
    # with 1,000 rules, a twentieth of the relay's memory). Reloads still compile off the loop.
    return assemble(prepare(decode_rules(data, str(path)), str(path)), ctx)


class _WatchThread:
    """watchfiles' blocking `watch` in a thread of its own; each batch it yields (an empty
    one when `timeout` ms pass without a change) goes to the loop. It stops within `step`
    ms of `stop` being set; `next()` then gives None, or raises what the watch raised."""

    def __init__(self, folders: list[str], relevant: Callable[[object, str], bool],
                 stop: threading.Event, *, debounce: int, step: int, timeout: int) -> None:
        # imported here, on the loop's thread: modules imported in another thread would
        # keep that thread's malloc arena in use for as long as the relay runs
        from watchfiles import watch
        self._loop = asyncio.get_running_loop()
        self._batches: asyncio.Queue[object] = asyncio.Queue()
        self._done = self._loop.create_future()
        self._args = (watch, folders, relevant, stop, debounce, step, timeout)
        threading.Thread(target=self._run, name="rules-watch", daemon=True).start()

    def _run(self) -> None:
        watch, folders, relevant, stop, debounce, step, timeout = self._args
        end: Optional[BaseException] = None
        try:
            for changes in watch(*folders, watch_filter=relevant, recursive=False,
                                 debounce=debounce, step=step, stop_event=stop,
                                 rust_timeout=timeout, yield_on_timeout=True):
                self._post(self._batches.put_nowait, changes)
        except Exception as exc:   # e.g. a folder removed while the watch starts
            end = exc
        self._post(self._batches.put_nowait, end)
        self._post(self._done.set_result, None)

    def _post(self, fn: Callable[[object], None], item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, item)
        except RuntimeError:   # the loop is closed: nobody waits any more
            pass

    async def next(self) -> Optional[set]:
        item = await self._batches.get()
        if isinstance(item, BaseException):
            raise item
        return item   # type: ignore[return-value]

    async def ended(self) -> None:
        """Wait until the thread has stopped (call after setting `stop`)."""
        await asyncio.shield(self._done)


def _watch_key(path: Path) -> tuple[frozenset[str], frozenset[str], tuple[int, ...]]:
    """What the current watch covers: the paths, their folders and those folders' inodes."""
    names, folders = resolution_chain(path)
    inodes = []
    for folder in sorted(folders):
        try:
            inodes.append(os.stat(folder).st_ino)
        except OSError:
            inodes.append(-1)
    return names, folders, tuple(inodes)


class Reloader:
    """Watch the rules file and swap in each valid new version.

    `on_swap(snapshot)` is called on the event loop with every new Snapshot; it must only
    assign the reference the scheduler reads. `initial` is the Snapshot the relay
    started with (built from the same file). With `spool`, the active version is written
    to `<spool>/active-rules.json` at start and after every reload.
    """

    def __init__(self, path: str | os.PathLike[str], ctx: "EngineContext",
                 on_swap: Callable[[Snapshot], None], initial: Snapshot, *,
                 spool: str | os.PathLike[str] | None = None,
                 settle: float = 0.05, step_ms: int = 50, debounce_ms: int = 400,
                 poll_interval_ms: int = 250,
                 before_retire: Optional[Callable[[Snapshot], Awaitable[None]]] = None) -> None:
        self.path = Path(path)
        # Awaited before the engines only `old` had are closed: an attempt that started
        # with the old snapshot may still need them further down its plan.
        self.before_retire = before_retire
        self.ctx = ctx
        self.on_swap = on_swap
        self.current = initial
        self.spool = Path(spool) if spool is not None else None
        self.settle = settle
        self.step_ms = step_ms
        self.debounce_ms = debounce_ms
        self.poll_interval_ms = poll_interval_ms
        self.ready = asyncio.Event()           # set once the folder watch is running
        self._stopped = asyncio.Event()
        self._watch_stop = threading.Event()   # the watch thread's copy of _stopped
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[object]] = set()
        self._seen: Optional[Fingerprint] = None   # first poll reads the file once
        self._seen_digest: Optional[str] = None   # digest of the last content we judged
        self._missing_logged = False
        self._refused: Optional[dict[str, object]] = None

    # --- control ---------------------------------------------------------------------

    def request(self, reason: str) -> None:
        """Ask for a reload from sync code (a signal handler); runs in the background."""
        self._spawn(self.reload_now(reason, force=True))

    def stop(self) -> None:
        self._stopped.set()
        self._watch_stop.set()

    async def run(self) -> None:
        """Watch until `stop()`; then wait for replaced engines to finish closing."""
        if self.spool is not None:
            await self._write_status()
        log.info("watching %s for changes (version %s active; SIGHUP reloads too)",
                 self.path, self.current.version)
        try:
            while not self._stopped.is_set():
                try:
                    await self._watch_once()
                except Exception as exc:   # e.g. a folder removed while the watch starts
                    # The reloader must never take the relay down: poll, then watch again.
                    log.warning("watching %s failed (%s); retrying", self.path, exc)
                    await self._wait_stop(self.poll_interval_ms / 1000)
                    await self._reconcile()
        finally:
            self.ready.clear()
            await self.drain()

    async def drain(self) -> None:
        """Wait for background reloads and engine retirements."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- watching --------------------------------------------------------------------

    async def _watch_once(self) -> None:
        """One watch over the current folder set; returns when the set must change."""
        key = _watch_key(self.path)
        names, folders, _inodes = key
        if not folders:
            # The folder itself is gone: poll until it comes back.
            self.ready.set()
            await self._wait_stop(self.poll_interval_ms / 1000)
            await self._reconcile()
            return

        def relevant(_change: object, changed: str) -> bool:
            return _norm(changed) in names

        stop = self._watch_stop = threading.Event()
        if self._stopped.is_set():
            return
        batches = _WatchThread(sorted(folders), relevant, stop, debounce=self.debounce_ms,
                               step=self.step_ms, timeout=self.poll_interval_ms)
        try:
            while (changes := await batches.next()) is not None:
                if not self.ready.is_set():
                    # The first batch comes after the watcher is set up: anything saved
                    # before then is caught by comparing the file with what we hold.
                    self.ready.set()
                if changes:
                    await self.reload_now("file changed")
                else:
                    await self._reconcile()   # also covers events the kernel never sent
                if _watch_key(self.path) != key:
                    # A symlink points elsewhere now, or a folder was replaced: watch anew.
                    return
        finally:
            stop.set()
            await batches.ended()

    async def _wait_stop(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _reconcile(self) -> None:
        if _stat_or_none(self.path) != self._seen:
            await self.reload_now("file changed")

    # --- one reload ------------------------------------------------------------------

    async def reload_now(self, reason: str, *, force: bool = False) -> ReloadResult:
        """Read, check and build the rules file; swap it in when it is valid.

        With `force` (SIGHUP) the file is rebuilt even when its content is unchanged, so
        secrets are read again. Never raises for a bad file.
        """
        async with self._lock:
            started = time.monotonic()
            try:
                return await self._reload(reason, force, started)
            except Exception:   # a bug must not stop the watch: keep the active rules
                log.exception("reload failed; version %s stays active", self.current.version)
                return ReloadResult(False, False, self.current.version, reason,
                                    "internal error", time.monotonic() - started)

    async def _unchanged(self, reason: str, started: float) -> ReloadResult:
        """Back to the active content (e.g. after a refused save): nothing to swap."""
        if self._refused is not None:
            self._refused = None
            if self.spool is not None:
                await self._write_status()
        return self._result(True, reason, "unchanged", started)

    async def _reload(self, reason: str, force: bool, started: float) -> ReloadResult:
        active = self.current.version
        try:
            data, fingerprint = await asyncio.to_thread(read_stable, self.path, self.settle)
        except FileNotFoundError:
            self._seen = None
            if not self._missing_logged:
                self._missing_logged = True
                log.warning("rules file %s is missing; version %s stays active",
                            self.path, active)
            return self._result(False, reason, "rules file is missing", started)
        except FileUnstable as exc:
            log.info("%s; will read it again on the next change", exc)
            self._seen = None   # make the next poll look again
            return self._result(False, reason, str(exc), started)
        except OSError as exc:
            self._seen = None
            return await self._refuse(reason, f"{self.path}: cannot read: {exc.strerror}",
                                      started)
        self._missing_logged = False
        self._seen = fingerprint
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._seen_digest and not force:
            return self._result(self._refused is None, reason, "unchanged", started)
        self._seen_digest = digest
        try:
            text = decode_rules(data, str(self.path))
            if not force and version_of(text) == active:
                # The active content (the first poll after start-up, or a save undone):
                # nothing to compile. A compile in a worker thread also leaves its garbage
                # in that thread's malloc arena (2.4 MiB for 1,000 rules).
                return await self._unchanged(reason, started)
            # compiled and its secrets read off the loop
            prepared = await asyncio.to_thread(prepare, text, str(self.path))
        except ReloadRefused as exc:
            return await self._refuse(reason, exc.text, started)
        if prepared.table.version == active and not force:
            return await self._unchanged(reason, started)
        new = assemble(prepared, self.ctx, self.current)
        old = self.current
        try:
            self.on_swap(new)
        except Exception:
            log.exception("swap failed; version %s stays active", active)
            self._spawn(_close_all(retired_engines(new, old)))
            return self._result(False, reason, "swap failed", started)
        self.current = new
        self._refused = None
        self._spawn(self._retire(old, new))
        took = time.monotonic() - started
        log.info("rules version %s active: %d engines, %d rules (%s, %.0f ms)",
                 new.version, len(new.engines), new.table.rule_count, reason, took * 1000)
        if self.spool is not None:
            await self._write_status()
        return ReloadResult(True, True, new.version, reason, "", took)

    async def _refuse(self, reason: str, detail: str, started: float) -> ReloadResult:
        log.error("%s\nreload refused; version %s stays active",
                  detail.rstrip("\n"), self.current.version)
        first = detail.strip().splitlines()[0] if detail.strip() else "refused"
        self._refused = {"at": time.time(), "reason": first}
        if self.spool is not None:
            await self._write_status()
        return self._result(False, reason, detail, started)

    def _result(self, accepted: bool, reason: str, detail: str, started: float) -> ReloadResult:
        return ReloadResult(accepted, False, self.current.version, reason, detail,
                            time.monotonic() - started)

    async def _write_status(self) -> None:
        from server.status import write_active

        try:
            await asyncio.to_thread(write_active, self.spool, self.current, self.path,
                                    self._refused)
        except OSError as exc:
            log.warning("cannot record the active rules version in %s: %s",
                        self.spool, exc.strerror)

    async def _retire(self, old: Snapshot, new: Snapshot) -> None:
        retired = retired_engines(old, new)
        if retired and self.before_retire is not None:
            await self.before_retire(old)
        await _close_all(retired)

    def _spawn(self, coro: Coroutine[object, object, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _close_all(engines: list) -> None:
    """Retire engines: each finishes its deliveries in flight, then closes its connections."""
    results = await asyncio.gather(*(engine.aclose() for engine in engines),
                                   return_exceptions=True)
    for engine, result in zip(engines, results):
        if isinstance(result, Exception):
            log.warning("closing engine %s failed: %s", getattr(engine, "name", "?"), result)
