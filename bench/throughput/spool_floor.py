"""The durable-accept floor on this disk: the relay's own Spool.accept with no SMTP at all.

    python bench/throughput/spool_floor.py [--writers 20] [--messages 3000] [--size 4400]

C writers each commit messages one after another, as C SMTP sessions would (each waits
for its own 250); reported: commits per second and p50/p99 commit latency, first for
server.queue.Spool.accept (since 2026-11-29 night: write and rename from the loop, then the
committing thread fsyncs the file, and the folder once per batch), then for a bare write + fsync + rename in a thread
pool (no folder fsync), to show what the folder's fsync costs. Runs under uvloop when
installed, in a scratch folder it removes."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from server.queue import Spool  # noqa: E402


async def commit_loop(n: int, writers: int, commit) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    per_writer = n // writers

    async def writer(w: int) -> None:
        for i in range(per_writer):
            t = time.perf_counter()
            await commit(w, i)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return time.perf_counter() - start, sorted(latencies)


def report(name: str, elapsed: float, lat: list[float]) -> None:
    print(f"{name:34} {len(lat) / elapsed:7.0f} commits/s   p50 {1000 * statistics.median(lat):6.1f} ms"
          f"   p99 {1000 * lat[int(0.99 * (len(lat) - 1))]:6.1f} ms")


async def main_async(args: argparse.Namespace) -> None:
    data = (b"X" * 76 + b"\r\n") * (args.size // 78)
    root = Path(tempfile.mkdtemp(prefix="routedsl-spool-floor-"))
    try:
        spool = Spool(root / "spool")
        spool.open()
        try:
            async def accept(w: int, i: int) -> None:
                await spool.accept("from@source.test", ["to@sink.test"], data)
            report("Spool.accept (file, then dir)", *await commit_loop(args.messages, args.writers, accept))
        finally:
            spool.close()

        bare = root / "bare"
        bare.mkdir()
        loop = asyncio.get_running_loop()

        def write_one(w: int, i: int) -> None:
            tmp = bare / f"t{w}.{i}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, bare / f"m{w}.{i}")

        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(16) as pool:
            async def bare_commit(w: int, i: int) -> None:
                await loop.run_in_executor(pool, write_one, w, i)
            report("write+fsync+rename (1 fsync)", *await commit_loop(args.messages, args.writers, bare_commit))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writers", type=int, default=20)
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--size", type=int, default=4400)
    args = p.parse_args()
    try:
        import uvloop
        uvloop.run(main_async(args))
    except ImportError:
        asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
