"""The spool's durable changes, made in batches by one thread (group commit).

Owns: the thread that takes every job waiting when it wakes, runs each one's file work,
fsyncs each folder the batch touched once, runs the jobs' after-steps, and then wakes the
event loop once for the whole batch.

A job's future is settled only after its own work and its folders' fsyncs, so "durable
before acknowledged" holds for each message of a batch; the batch shares the folder
fsyncs, the thread's wake-up and the loop's. Never decides what to write (server.queue).
"""
from __future__ import annotations

import asyncio
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(slots=True, eq=False)
class _Job:
    work: Callable[[], Any]
    folders: tuple[int, ...]                # fsynced, once per batch, after the work
    undo: Optional[Callable[[], None]]      # when a folder's fsync fails after the work
    after: Optional[Callable[[], None]]     # once the folders are durable
    future: "asyncio.Future[Any]"
    loop: asyncio.AbstractEventLoop
    result: Any = None
    error: Optional[BaseException] = None


class GroupCommit:
    """One committing thread; `submit` from the event loop, `close` once at the end."""

    def __init__(self, name: str = "spool-commit") -> None:
        self._jobs: queue.SimpleQueue[Optional[_Job]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], Any], *, folders: tuple[int, ...] = (),
               undo: Optional[Callable[[], None]] = None,
               after: Optional[Callable[[], None]] = None) -> "asyncio.Future[Any]":
        """Run `work` in the committing thread, then fsync `folders`, then `after`. The
        future has work's result once all of that is done, or the first error."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put(_Job(work, folders, undo, after, future, loop))
        return future

    def close(self) -> None:
        """Finish the jobs already submitted, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            _commit(batch)
            if stop:
                return


def _commit(batch: list[_Job]) -> None:
    for job in batch:
        try:
            job.result = job.work()
        except BaseException as exc:  # handed to the waiting coroutine, never lost here
            job.error = exc
    failed: dict[int, OSError] = {}
    for fd in dict.fromkeys(fd for job in batch if job.error is None for fd in job.folders):
        try:
            os.fsync(fd)
        except OSError as exc:
            failed[fd] = exc
    for job in batch:
        if job.error is not None:
            continue
        bad = next((failed[fd] for fd in job.folders if fd in failed), None)
        step = job.after if bad is None else job.undo
        if bad is not None:
            job.error = bad
        if step is not None:
            try:
                step()
            except BaseException as exc:
                job.error = job.error or exc
    by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
    for job in batch:
        by_loop.setdefault(job.loop, []).append(job)
    for loop, jobs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, jobs)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass


def _settle(jobs: list[_Job]) -> None:
    for job in jobs:
        if job.future.done():  # the waiter was cancelled (shielded callers never are)
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.result)
