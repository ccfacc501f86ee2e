"""The two relays under test, started and stopped the same way, measured the same way.

Owns: the configuration of each relay for each variant (base, 1,000 rules, half the mail
failing over from a dead first engine), starting and stopping it, and reading its CPU
seconds and memory from /proc.

    PostfixRelay   a private Postfix instance (tests/support/postfix.py), default durability,
                   relayhost = the sink; variants through transport_maps (texthash) and
                   smtp_fallback_relay.
    RoutedslRelay  `python -m routedsl serve routes.rules --spool DIR --listen 127.0.0.1:PORT`
                   with smarthost engines to the sink (tls none).

Never: listens or connects outside 127.0.0.0/8; leaves a relay process running.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import procstat
from peers import free_port, stop_process, wait_for_banner
from probe import PROBE_DOMAIN

from tests.support.postfix import PrivatePostfix

LOAD_DOMAIN = "sink.test"          # load recipients: to@sink.test
FAILOVER_DOMAIN = "half.test"      # in the failover variant, half the load goes here
VARIANTS = ("base", "rules1000", "failover")


def routes_text(variant: str, sink_port: int, probe_port: int, dead_port: int,
                connections: int | None = None) -> str:
    """routes.rules for routedsl: everything to the sink; probes to the probe sink.

    ``connections``: the sink engine's connection limit (default: the language's, 10;
    Postfix opens up to 20 to one destination by default).
    """
    conn = f" connections {connections}" if connections else ""
    lines = [
        f"# routedsl benchmark, variant {variant}",
        f"engine sink  = smtp://127.0.0.1:{sink_port} tls none{conn}",
        f"engine probe = smtp://127.0.0.1:{probe_port} tls none",
    ]
    if variant in ("rules1000", "failover"):
        # Nothing listens on dead_port: connection refused, an engine fault.
        lines.append(f"engine dead  = smtp://127.0.0.1:{dead_port} tls none")
    if variant == "rules1000":
        lines += _thousand_rules()
    if variant == "failover":
        lines.append(f"if destination is {FAILOVER_DOMAIN} then try dead first")
    lines.append(f"if destination is {PROBE_DOMAIN} then use only probe")
    return "\n".join(lines) + "\n"


def _thousand_rules() -> list[str]:
    """1,000 rules that the load never matches, of every kind a real file holds.

    600 exact destinations, 200 exact senders, 100 `one of` lists, 100 regular expressions
    (which cannot be indexed and are evaluated for every recipient that reaches them).
    """
    rules = []
    for i in range(600):
        rules.append(f"if destination is d{i:04d}.example then try dead first")
    for i in range(200):
        rules.append(f"if from is user{i:04d}@senders.example then use only dead")
    for i in range(100):
        rules.append(f"if destination is one of a{i:04d}.example, b{i:04d}.example then try dead first")
    for i in range(100):
        rules.append(f'if recipient matches "^r{i:04d}-[a-z]+@m[.]example$" then try dead first')
    return rules


def transport_text(variant: str, probe_port: int, dead_port: int) -> str:
    """Postfix transport map (texthash) with the same shape as the routedsl rules."""
    lines = [f"{PROBE_DOMAIN} smtp:[127.0.0.1]:{probe_port}"]
    if variant == "rules1000":
        lines += [f"d{i:04d}.example smtp:[127.0.0.1]:{dead_port}" for i in range(1000)]
    if variant == "failover":
        lines.append(f"{FAILOVER_DOMAIN} smtp:[127.0.0.1]:{dead_port}")
    return "\n".join(lines) + "\n"


class PostfixRelay:
    name = "postfix"

    def __init__(self, variant: str, sink_port: int, probe_port: int, dead_port: int) -> None:
        self.variant = variant
        self.host = "127.0.0.1"
        self._pf = PrivatePostfix(host=self.host, next_hop=("127.0.0.1", sink_port))
        self.port = self._pf.port
        self._maps = self._pf.root / "maps"
        self._maps.mkdir(parents=True, exist_ok=True)
        os.chmod(self._maps, 0o755)
        transport = self._maps / "transport"
        transport.write_text(transport_text(variant, probe_port, dead_port))
        os.chmod(transport, 0o644)
        self._pf.extra_main["transport_maps"] = f"texthash:{transport}"
        if variant == "failover":
            self._pf.extra_main["smtp_fallback_relay"] = f"[127.0.0.1]:{sink_port}"
        self.peak_memory_kib = 0

    def start(self) -> None:
        self._pf.start()

    def stop(self) -> None:
        self._pf.stop()

    def cpu_seconds(self) -> float:
        return self._pf.usage().cpu_seconds

    def memory_kib(self) -> int:
        """Summed PSS of the master and its services (RSS would count shared pages ~6x)."""
        return procstat.pss_kib(self._pf.pids())

    def processes(self) -> int:
        return len(self._pf.pids())

    def log_tail(self) -> str:
        return self._pf.log_tail()


class RoutedslRelay:
    """routedsl as a subprocess; with ``patches``, through tuned_serve.py (system "tuned")."""

    def __init__(self, variant: str, sink_port: int, probe_port: int, dead_port: int,
                 extra_args: tuple[str, ...] = (), patches: str | None = None,
                 connections: int | None = None) -> None:
        self.name = "routedsl" if patches is None else "tuned"
        self.patches = patches
        self.variant = variant
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.root = Path(tempfile.mkdtemp(prefix="routedsl-bench-"))
        self.rules = self.root / "routes.rules"
        self.rules.write_text(routes_text(variant, sink_port, probe_port, dead_port, connections))
        self.spool = self.root / "spool"
        self.log_file = self.root / "relay.log"
        self.extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def command(self) -> list[str]:
        launcher = ["-m", "routedsl"] if self.patches is None else [
            str(Path(__file__).resolve().with_name("tuned_serve.py")), "--patches", self.patches]
        return [sys.executable, *launcher, "serve", str(self.rules),
                "--spool", str(self.spool), "--listen", f"{self.host}:{self.port}",
                "--hostname", "relay.test", *self.extra_args]

    def start(self) -> None:
        with self.log_file.open("wb") as log:
            self._proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.root,
            )
        try:
            wait_for_banner(self.host, self.port, 30)
        except TimeoutError as exc:
            self.stop()
            raise RuntimeError(f"routedsl did not start: {exc}\n{self.log_tail()}") from exc

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, timeout=40)
            self._proc = None

    def cpu_seconds(self) -> float:
        # with --smtp-processes the intake runs in live children of the relay's process
        return procstat.cpu_seconds(self.pid, reaped_children=True) + sum(
            procstat.cpu_seconds(child) for child in procstat.children_of(self.pid))

    def memory_kib(self) -> int:
        return procstat.pss_kib([self.pid, *procstat.children_of(self.pid)])

    def peak_rss_kib(self) -> int:
        return procstat.status_kib(self.pid, "VmHWM")

    def processes(self) -> int:
        return 1 + len(procstat.children_of(self.pid))

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


SYSTEMS = ("postfix", "routedsl", "tuned")
# `routedsl-pN`: routedsl with `--smtp-processes N` (e.g. routedsl-p2)
_PROCESSES = re.compile(r"routedsl-p(\d+)")


def known_system(system: str) -> bool:
    return system in SYSTEMS or _PROCESSES.fullmatch(system) is not None


def make_relay(system: str, variant: str, sink_port: int, probe_port: int, dead_port: int,
               routedsl_args: tuple[str, ...] = (), patches: str = "all",
               connections: int | None = None) -> PostfixRelay | RoutedslRelay:
    if system == "postfix":
        return PostfixRelay(variant, sink_port, probe_port, dead_port)
    if system == "tuned":
        return RoutedslRelay(variant, sink_port, probe_port, dead_port, routedsl_args, patches,
                             connections)
    processes = _PROCESSES.fullmatch(system)
    if processes is not None:
        relay = RoutedslRelay(variant, sink_port, probe_port, dead_port,
                              (*routedsl_args, "--smtp-processes", processes.group(1)), connections=connections)
        relay.name = system
        return relay
    return RoutedslRelay(variant, sink_port, probe_port, dead_port, routedsl_args,
                         connections=connections)
