"""Side-by-side throughput benchmark: routedsl against a private Postfix, same load, same sink.

    python bench/throughput/run.py --quick          # base variant, both shapes, 3 paired rounds
    python bench/throughput/run.py                  # every variant (see --help)

Load: Postfix's smtp-source, N messages of 4 KiB over C sessions, either many messages per
connection (-d, shape "reuse") or one per connection (shape "single"). Sink: smtp-sink,
counted by one reader. Latency: a thin stream of numbered probes through the same relay to
a sink of our own. Runs alternate A B A B (Postfix, routedsl) and each figure is reported
per run; the routedsl/Postfix ratio is the median of the paired rounds, with min and max.

A tool, not a test: nothing here asserts a time. Bounded (per-step timeouts and --max-minutes),
loopback only, and every process it starts is stopped by the pid it got.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))          # the repository: tests.support.postfix

import procstat  # noqa: E402
from peers import SmtpSink, ensure_packages, free_port, smtp_source  # noqa: E402
from probe import ProbeSink, Prober, latencies  # noqa: E402
from relays import FAILOVER_DOMAIN, LOAD_DOMAIN, VARIANTS, known_system, make_relay  # noqa: E402

log = logging.getLogger("routedsl.bench")

SHAPES = {"reuse": True, "single": False}         # reuse = smtp-source -d


@dataclasses.dataclass(frozen=True)
class RunResult:
    system: str
    variant: str
    shape: str
    round: int
    messages: int
    delivered: int
    complete: bool
    e2e_msg_s: float                 # N / (last arrival at the sink - load start)
    accept_msg_s: float              # N / (smtp-source exit - load start)
    p50_ms: float | None             # probe latency, relay's 250 -> arrival at the probe sink
    p99_ms: float | None
    probes: int
    accept_p50_ms: float | None      # probe transaction (MAIL .. 250 after DATA): fsync included
    cpu_ms_per_msg: float
    memory_kib: int                  # postfix: peak summed PSS; routedsl: peak PSS
    peak_rss_kib: int | None         # routedsl: VmHWM
    processes: int
    source_rc: int
    note: str = ""


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


async def one_run(system: str, variant: str, shape: str, rnd: int, args: argparse.Namespace) -> RunResult:
    sink = SmtpSink()
    probe_sink = ProbeSink()
    relay = None
    note = ""
    await asyncio.to_thread(sink.start)
    try:
        await probe_sink.start()
        dead_port = free_port()
        relay = make_relay(system, variant, sink.port, probe_sink.port, dead_port,
                           tuple(args.routedsl_arg), args.tuned_patches, args.engine_connections)
        await asyncio.to_thread(relay.start)
        await asyncio.sleep(0.5)                 # let start-up work settle before the CPU baseline
        cpu0 = relay.cpu_seconds()
        sampler = procstat.PeakSampler(relay.memory_kib, 0.5)
        sampler.start()
        prober = Prober(relay.host, relay.port, args.probe_interval)
        prober.start()
        profiler = None
        if args.profile and system != "postfix":
            profiler = start_profiler(relay.pid, args.profile / f"{variant}-{shape}-{rnd}.txt")

        n = args.messages
        timeout = args.source_timeout
        reuse = SHAPES[shape]
        if variant == "failover":
            halves = [(n - n // 2, f"to@{LOAD_DOMAIN}"), (n // 2, f"to@{FAILOVER_DOMAIN}")]
            loads = [smtp_source(relay.host, relay.port, messages=m, sessions=max(1, args.sessions // 2),
                                 size=args.size, reuse=reuse, sender="from@source.test",
                                 recipient=rcpt, timeout=timeout) for m, rcpt in halves]
        else:
            loads = [smtp_source(relay.host, relay.port, messages=n, sessions=args.sessions,
                                 size=args.size, reuse=reuse, sender="from@source.test",
                                 recipient=f"to@{LOAD_DOMAIN}", timeout=timeout)]
        sources = await asyncio.gather(*loads)
        for s in sources:
            if s.returncode:
                print(f"smtp-source ended {s.returncode} after {s.finished - s.started:.1f}s: "
                      f"{s.output.strip()[-500:]}", file=sys.stderr)
        start = min(s.started for s in sources)
        accepted_at = max(s.finished for s in sources)
        source_rc = max((s.returncode for s in sources), key=abs)
        if source_rc != 0:
            note = "smtp-source: " + " | ".join(s.output.strip()[-300:] for s in sources if s.returncode)

        complete = await sink.wait_for(n, args.drain_timeout)
        delivered = sink.count
        if profiler is not None:
            await asyncio.to_thread(stop_profiler, profiler)
        last = sink.time_of(min(delivered, n)) or time.monotonic()
        await prober.stop()
        # Probes already accepted must arrive too (bounded), or their latency is unknown.
        deadline = time.monotonic() + 15
        while (set(prober.accepted) - set(probe_sink.arrivals)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        cpu = relay.cpu_seconds() - cpu0
        memory = await sampler.stop()
        peak_rss = relay.peak_rss_kib() if hasattr(relay, "peak_rss_kib") else None
        processes = relay.processes()
        lat = latencies(prober, probe_sink)
        handled = n + len(prober.accepted)
        if not complete:
            note = (note + f" only {delivered}/{n} arrived within {args.drain_timeout:.0f}s").strip()
        return RunResult(
            system=system, variant=variant, shape=shape, round=rnd, messages=n,
            delivered=delivered, complete=complete,
            e2e_msg_s=min(delivered, n) / max(1e-6, last - start),
            accept_msg_s=n / max(1e-6, accepted_at - start),
            p50_ms=_ms(percentile(lat, 0.50)), p99_ms=_ms(percentile(lat, 0.99)),
            probes=len(lat),
            accept_p50_ms=_ms(percentile(list(prober.transaction.values()), 0.50)),
            cpu_ms_per_msg=1000 * cpu / max(1, handled),
            memory_kib=memory, peak_rss_kib=peak_rss, processes=processes,
            source_rc=source_rc, note=note,
        )
    finally:
        if relay is not None:
            if args.keep_logs:
                print(f"--- {system} log tail ---\n{relay.log_tail()}", file=sys.stderr)
            await asyncio.to_thread(relay.stop)
            if hasattr(relay, "remove"):
                relay.remove()
        await probe_sink.stop()
        await asyncio.to_thread(sink.stop)


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the relay (collapsed stacks, one line per stack), until stop_profiler."""
    out.parent.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen(
        [str(py_spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "250",
         "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT makes py-spy write its file; SIGKILL only if it will not finish."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def _fmt(v: float | None, digits: int = 0) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def medians(results: list[RunResult]) -> str:
    """Markdown: per variant, shape and system, the median of each figure over the rounds."""
    out = ["| variant | shape | system | runs | e2e msg/s | accept msg/s | p50 / p99 ms | 250 p50 ms | CPU ms/msg | memory MiB (PSS) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(r.system for r in results))   # as the runs were made
    keys = sorted({(r.variant, r.shape, r.system) for r in results},
                  key=lambda k: (VARIANTS.index(k[0]), k[1], order.index(k[2])))
    for variant, shape, system in keys:
        runs = [r for r in results if (r.variant, r.shape, r.system) == (variant, shape, system)]

        def med(get) -> float | None:
            vals = [get(r) for r in runs if get(r) is not None]
            return statistics.median(vals) if vals else None
        out.append(f"| {variant} | {shape} | {system} | {len(runs)} | {_fmt(med(lambda r: r.e2e_msg_s))} | "
                   f"{_fmt(med(lambda r: r.accept_msg_s))} | {_fmt(med(lambda r: r.p50_ms))} / "
                   f"{_fmt(med(lambda r: r.p99_ms))} | {_fmt(med(lambda r: r.accept_p50_ms), 1)} | "
                   f"{_fmt(med(lambda r: r.cpu_ms_per_msg), 2)} | {_fmt(med(lambda r: r.memory_kib / 1024), 1)} |")
    return "\n".join(out)


def summary(results: list[RunResult]) -> str:
    """Markdown: every run, the medians, then per variant and shape the paired ratios."""
    out = ["| round | variant | shape | system | msg/s e2e | accept msg/s | p50 ms | p99 ms | 250 p50 ms | CPU ms/msg | memory MiB | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mem = r.memory_kib / 1024
        memory = f"{mem:.1f} PSS" + (f" / {r.peak_rss_kib / 1024:.1f} HWM" if r.peak_rss_kib else f" ({r.processes} procs)")
        out.append(f"| {r.round} | {r.variant} | {r.shape} | {r.system} | {_fmt(r.e2e_msg_s)} | "
                   f"{_fmt(r.accept_msg_s)} | {_fmt(r.p50_ms, 1)} | {_fmt(r.p99_ms, 1)} | {_fmt(r.accept_p50_ms, 1)} | "
                   f"{_fmt(r.cpu_ms_per_msg, 2)} | {memory} | {r.note} |")
    systems = list(dict.fromkeys(r.system for r in results))
    out += ["", medians(results)]
    out += ["", "| ratio | variant | shape | pairs | e2e msg/s: median [min, max] | accept msg/s | CPU/msg | memory (PSS) | p50 latency |",
            "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r.variant, r.shape) for r in results}, key=lambda k: (VARIANTS.index(k[0]), k[1]))
    for i, base in enumerate(systems):
        for other in systems[i + 1:]:
            for variant, shape in keys:
                pairs = []
                for rnd in sorted({r.round for r in results}):
                    by = {r.system: r for r in results if (r.variant, r.shape, r.round) == (variant, shape, rnd)}
                    if base in by and other in by:
                        pairs.append((by[base], by[other]))
                if not pairs:
                    continue

                def ratio(get) -> str:
                    vals = [get(b) / get(a) for a, b in pairs if get(a) and get(b) is not None]
                    if not vals:
                        return "–"
                    return f"{statistics.median(vals):.2f} [{min(vals):.2f}, {max(vals):.2f}]"

                out.append(f"| {other}/{base} | {variant} | {shape} | {len(pairs)} | {ratio(lambda r: r.e2e_msg_s)} | "
                           f"{ratio(lambda r: r.accept_msg_s)} | {ratio(lambda r: r.cpu_ms_per_msg)} | "
                           f"{ratio(lambda r: r.memory_kib)} | {ratio(lambda r: r.p50_ms)} |")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="2,000 messages, base variant only, both shapes, 3 rounds")
    p.add_argument("--messages", "-n", type=int, default=None, help="messages per run (default 5000; quick 2000)")
    p.add_argument("--sessions", "-c", type=int, default=20, help="parallel smtp-source sessions (20)")
    p.add_argument("--size", type=int, default=4096, help="message payload bytes (4096)")
    p.add_argument("--rounds", type=int, default=3, help="paired rounds, A B A B (3)")
    p.add_argument("--variants", default=None, help=f"comma list of {','.join(VARIANTS)}")
    p.add_argument("--shapes", default="reuse,single", help="comma list of reuse,single")
    p.add_argument("--systems", default="postfix,routedsl",
                   help="comma list of postfix,routedsl,tuned,routedsl-pN (tuned: routedsl with --tuned-patches; "
                        "routedsl-pN: with --smtp-processes N)")
    p.add_argument("--tuned-patches", default="all",
                   help="patches for the tuned system (see tuned_serve.py), comma list or all")
    p.add_argument("--engine-connections", type=int, default=None, metavar="N",
                   help="`connections N` on routedsl's sink engine (default: the language's 10)")
    p.add_argument("--probe-interval", type=float, default=0.05, help="seconds between latency probes")
    p.add_argument("--source-timeout", type=float, default=180.0)
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--max-minutes", type=float, default=30.0, help="skip runs that would start later")
    p.add_argument("--routedsl-arg", action="append", default=[], help="extra flag for routedsl serve")
    p.add_argument("--json", type=Path, default=None, help="also write every run as JSON here")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="record routedsl under load with py-spy (collapsed stacks) into DIR")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="print the tables for runs saved with --json, and run nothing")
    p.add_argument("--keep-logs", action="store_true", help="print each relay's log tail")
    args = p.parse_args(argv)
    if args.messages is None:
        args.messages = 2000 if args.quick else 5000
    if args.variants is None:
        args.variants = "base" if args.quick else ",".join(VARIANTS)
    args.variants = [v for v in args.variants.split(",") if v]
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.systems = [s for s in args.systems.split(",") if s]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}")
    for s in args.systems:
        if not known_system(s):
            p.error(f"unknown system {s!r}")
    for s in args.shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}")
    return args


async def main_async(args: argparse.Namespace) -> list[RunResult]:
    # SIGTERM/SIGINT cancel the runs, so every `finally` stops what it started.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    results: list[RunResult] = []
    try:
        await _all_runs(args, results)
    except asyncio.CancelledError:
        print("interrupted: stopped every process started so far", file=sys.stderr)
    return results


async def _all_runs(args: argparse.Namespace, results: list[RunResult]) -> None:
    deadline = time.monotonic() + 60 * args.max_minutes
    for rnd in range(1, args.rounds + 1):
        for variant in args.variants:
            for shape in args.shapes:
                for system in args.systems:          # A B, A B, ...
                    if time.monotonic() > deadline:
                        print(f"skipped {system} {variant} {shape} round {rnd}: past --max-minutes",
                              file=sys.stderr)
                        continue
                    try:
                        r = await one_run(system, variant, shape, rnd, args)
                    except Exception as exc:            # a failed run is a row, not a crash
                        print(f"{system} {variant} {shape} round {rnd} failed: {exc}", file=sys.stderr)
                        continue
                    results.append(r)
                    if args.json:                        # keep what we have if interrupted later
                        args.json.write_text(json.dumps([dataclasses.asdict(x) for x in results], indent=1))
                    print(f"round {rnd} {variant:9} {shape:6} {system:8} e2e {r.e2e_msg_s:7.0f} msg/s  "
                          f"accept {r.accept_msg_s:7.0f}  250 p50 {_fmt(r.accept_p50_ms, 1)} ms  p50 {_fmt(r.p50_ms, 1)} ms  p99 {_fmt(r.p99_ms, 1)} ms  "
                          f"cpu {r.cpu_ms_per_msg:.2f} ms/msg  mem {r.memory_kib / 1024:.1f} MiB  {r.note}",
                          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        print(summary([RunResult(**{"accept_p50_ms": None, **r}) for r in saved]))
        return 0
    ensure_packages()
    results = asyncio.run(main_async(args))
    print(summary(results))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
