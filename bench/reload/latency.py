"""Hot-reload latency: from saving routes.rules to the first message routed by the new rule.

    python bench/reload/latency.py [--saves 20] [--rules 50]

Run from the repository root. Two measurements, each over --saves saves that alternate
two rule sets (every dNN.test -> s0, then -> s1), saved the supported way (temp + rename):

  in-process   a Reloader over the real compiler and engines: save -> on_swap called
  end to end   `routedsl serve` in a subprocess with three loopback sinks: save -> the
               first probe message (sent every 10 ms) arrives at the newly chosen sink

Loopback only; every server and the relay are stopped before it exits. A tool, not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from server.engines.base import EngineContext  # noqa: E402
from server.reload import Reloader  # noqa: E402
from server.snapshot import build_snapshot  # noqa: E402
from tests.reload.sinks import Sink  # noqa: E402
from tests.reload.test_e2e import send  # noqa: E402
from tests.support.relay import RelayProcess  # noqa: E402


def rules_text(urls: dict[str, str], chosen: str, count: int) -> str:
    lines = [f"engine {name} = {url} tls none" for name, url in urls.items()]
    lines += [f"if destination is d{n:02d}.test then use only {chosen}" for n in range(count)]
    return "\n".join(lines) + "\n"


def save(path: Path, text: str) -> float:
    temp = path.with_name(".routes.rules.tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    return time.monotonic()


async def in_process(saves: int, count: int, folder: Path) -> list[float]:
    urls = {"trap": "smtp://127.0.0.1:9", "s0": "smtp://127.0.0.1:10", "s1": "smtp://127.0.0.1:11"}
    path = folder / "routes.rules"
    path.write_text(rules_text(urls, "s0", count))
    ctx = EngineContext(hostname="bench.test")
    swapped: list[float] = []
    reloader = Reloader(path, ctx, lambda _s: swapped.append(time.monotonic()),
                        build_snapshot(path.read_text(), str(path), ctx))
    task = asyncio.create_task(reloader.run())
    await asyncio.wait_for(reloader.ready.wait(), 10)
    latencies = []
    for number in range(saves):
        await asyncio.sleep(0.2)   # let the previous save settle before the next one
        before = len(swapped)
        saved = save(path, rules_text(urls, "s1" if number % 2 == 0 else "s0", count))
        while len(swapped) == before:
            await asyncio.sleep(0.001)
        latencies.append(swapped[-1] - saved)
    reloader.stop()
    await task
    return latencies


async def end_to_end(saves: int, count: int, folder: Path) -> list[float]:
    latencies = []
    pending: set[asyncio.Future] = set()
    async with Sink("trap") as trap, Sink("s0") as s0, Sink("s1") as s1:
        urls = {"trap": trap.url, "s0": s0.url, "s1": s1.url}
        path = folder / "routes.rules"
        path.write_text(rules_text(urls, "s0", count))
        relay = RelayProcess(path, folder / "spool")
        await relay.astart()
        try:
            for number in range(saves):
                target = s1 if number % 2 == 0 else s0
                await asyncio.sleep(0.3)
                probe = f"probe-{number}@d07.test"   # earlier probes never count
                saved = save(path, rules_text(urls, target.name, count))
                while not (hits := [a.at for a in target.arrivals if probe in a.recipients]):
                    if time.monotonic() - saved > 10:
                        raise SystemExit("no message routed by the new rule within 10 s")
                    pending.add(asyncio.ensure_future(send(relay, probe)))
                    await asyncio.sleep(0.01)
                latencies.append(min(hits) - saved)
        finally:
            await asyncio.gather(*pending, return_exceptions=True)
            await relay.astop()
    return latencies


def summary(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return (f"{name:12s} n={len(ms)}  median {statistics.median(ms):6.0f} ms  "
            f"p90 {p90:6.0f} ms  min {ms[0]:6.0f} ms  max {ms[-1]:6.0f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=20)
    parser.add_argument("--rules", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        inproc = await in_process(args.saves, args.rules, Path(scratch))
    with tempfile.TemporaryDirectory() as scratch:
        e2e = await end_to_end(args.saves, args.rules, Path(scratch))
    print(f"rules per file: {args.rules}, saves: {args.saves}")
    print(summary("in-process", inproc))
    print(summary("end to end", e2e))


if __name__ == "__main__":
    asyncio.run(main())
