"""CPU and memory of processes, read from /proc: the benchmark's resource figures.

Owns: utime+stime of a process (and, for a supervisor, of the children it reaped), peak RSS
(VmHWM) and proportional set size (smaps_rollup Pss) of one process or a set of them, and a
sampler that keeps the peak of a summed figure over a run.
Never: signals or otherwise touches the processes it reads.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    return text[text.rfind(")") + 2:].split()


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """utime + stime of ``pid`` (all its threads); plus cutime + cstime when asked."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICKS


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status (VmHWM, VmRSS), in KiB; 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pids: Iterable[int]) -> int:
    """Summed proportional set size of ``pids`` in KiB (shared pages split between sharers)."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
                break
    return total


def children_of(parent: int) -> list[int]:
    """Live processes whose parent is ``parent``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and int(fields[1]) == parent and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


class PeakSampler:
    """Samples ``measure()`` every ``interval`` seconds in the running loop; keeps the peak."""

    def __init__(self, measure: Callable[[], int], interval: float = 0.5) -> None:
        self.measure = measure
        self.interval = interval
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.measure())
            await asyncio.sleep(self.interval)

    async def stop(self) -> int:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=5)   # lets our own cancellation through
        self.peak = max(self.peak, self.measure())
        return self.peak
