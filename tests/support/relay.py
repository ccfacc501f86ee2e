"""Run `routedsl serve` as a real subprocess for end-to-end tests.

    relay = RelayProcess(rules_file, spool_dir, nameserver=dns.nameserver, ca_file=ca_path)
    relay.start()                 # waits until it accepts connections (or fails with its log)
    smtplib.SMTP(*relay.address)  # talk to it
    relay.kill(); relay.start()   # SIGKILL, then restart on the same spool and port
    relay.stop()                  # SIGTERM, SIGKILL after a deadline; returns the exit code
    relay.log                     # everything it wrote to stderr, over every run
    relay.wait_for_log(r"result=delivered")   # poll the log with a deadline
    relay.signal(signal.SIGHUP)   # reload its rules

Options: `args=[...]` adds serve flags (a repeated flag overrides the runner's own, e.g.
`--spool`), `env={...}` adds environment variables (secrets), `listen="127.0.0.1:PORT"`
fixes the address (default: a free port outside the ephemeral range, `stable_port()`,
which a restart gets back). Backoffs default to 1s..2s and the stop timeout to 5s.

From async tests (whose fake servers run on the test's event loop) use the `a`-prefixed
methods, which wait in a thread so the loop keeps serving: `await relay.astart()`,
`await relay.astop()`, `await relay.akill()`, `await relay.await_log(pattern)`, or
`async with relay:`. Every process started is stopped by `stop()`/`kill()` or by leaving
the `with` block; nothing outlives the test.

In-process, in the test's own event loop (no signals, no subprocess; faster to start, and
the parts are reachable: `relay.spool`, `relay.scheduler`, `relay.snapshot`):

    async with in_process_relay(rules_file, spool_dir, "--nameserver", ns) as relay:
        host, port = relay.addresses[0].host, relay.addresses[0].port
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

_SERVING = re.compile(r"serving on (\S+)")
_MODULE = "routedsl" if importlib.util.find_spec("routedsl.__main__") else "server.cli"


class RelayExited(AssertionError):
    """The relay stopped while we waited for it; the message carries its log."""


class RelayProcess:
    def __init__(self, rules: Path | str, spool: Path | str, *, nameserver: Optional[str] = None,
                 ca_file: Optional[Path | str] = None, hostname: str = "relay.test",
                 listen: str = "127.0.0.1:0", min_backoff: str = "1s", max_backoff: str = "2s",
                 args: Iterable[str] = (), env: Optional[Mapping[str, str]] = None) -> None:
        self.rules = Path(rules)
        self.spool = Path(spool)
        self.nameserver = nameserver
        self.ca_file = ca_file
        self.hostname = hostname
        self.listen = listen
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.extra = list(args)
        self.env = dict(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self.address: Optional[tuple[str, int]] = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader: Optional[threading.Thread] = None

    # -- the command ---------------------------------------------------------------
    def command(self) -> list[str]:
        if self.address:
            listen = f"{self.address[0]}:{self.address[1]}"
        else:
            host, _, port = self.listen.rpartition(":")
            listen = f"{host}:{stable_port(host)}" if port == "0" else self.listen
        cmd = [sys.executable, "-m", _MODULE, "serve", str(self.rules), "--listen", listen,
               "--spool", str(self.spool), "--hostname", self.hostname,
               "--min-backoff", self.min_backoff, "--max-backoff", self.max_backoff,
               "--shutdown-timeout", "5s"]
        if self.nameserver:
            cmd += ["--nameserver", self.nameserver]
        if self.ca_file:
            cmd += ["--ca-file", str(self.ca_file)]
        return cmd + self.extra

    # -- lifecycle -----------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> "RelayProcess":
        """Start (or restart on the same spool and port) and wait until it accepts connections."""
        assert not self.running, "relay already running"
        for _ in range(2 if self.address is None else 0):
            try:
                return self._start(timeout)
            except RelayExited as exc:
                if "cannot listen" not in str(exc):
                    raise
                # the port picked was taken meanwhile: pick another one
        return self._start(timeout)

    def _start(self, timeout: float) -> "RelayProcess":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        mark = len(self._lines)
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env, text=True, errors="replace")
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise RelayExited(f"relay exited with {self.proc.returncode} during start-up:\n{self.log_since(mark)}")
            found = self._serving_address(mark)
            if found and _accepts(found):
                self.address = found
                return self
            time.sleep(0.02)
        self.kill()
        raise RelayExited(f"relay did not accept connections within {timeout}s:\n{self.log_since(mark)}")

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code (negative for a signal)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self._finish()

    def kill(self) -> Optional[int]:
        """SIGKILL at once (the crash case)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        return self._finish()

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(sig)

    def _finish(self) -> Optional[int]:
        assert self.proc is not None
        code = self.proc.returncode
        if self._reader is not None:
            self._reader.join(5)
        self.proc = None
        return code

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def astart(self, timeout: float = 20.0) -> "RelayProcess":
        return await asyncio.to_thread(self.start, timeout)

    async def astop(self, timeout: float = 15.0) -> Optional[int]:
        return await asyncio.to_thread(self.stop, timeout)

    async def akill(self) -> Optional[int]:
        return await asyncio.to_thread(self.kill)

    def __enter__(self) -> "RelayProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def __aenter__(self) -> "RelayProcess":
        return await self.astart()

    async def __aexit__(self, *exc) -> None:
        await self.astop()

    # -- the log -------------------------------------------------------------------
    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._lock:
                self._lines.append(line.rstrip("\n"))
        proc.stderr.close()

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def log_since(self, mark: int) -> str:
        with self._lock:
            return "\n".join(self._lines[mark:])

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """Poll the log until `pattern` (a regex) appears; fail with the log otherwise."""
        look = self._log_poll(pattern, timeout)
        while (m := look()) is None:
            time.sleep(0.02)
        return m

    async def await_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """`wait_for_log` for async tests: polls without blocking the test's event loop."""
        look = self._log_poll(pattern, timeout)
        while (m := look()) is None:
            await asyncio.sleep(0.02)
        return m

    def _log_poll(self, pattern: str, timeout: float) -> Callable[[], Optional[re.Match]]:
        """One look at the log per call: the match, None to look again, AssertionError (with
        the log) once `timeout` has passed."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout

        def look() -> Optional[re.Match]:
            m = rx.search(self.log)
            if m is None and time.monotonic() > deadline:
                raise AssertionError(f"no log line matching {pattern!r} within {timeout}s:\n{self.log}")
            return m
        return look

    def _serving_address(self, mark: int) -> Optional[tuple[str, int]]:
        m = _SERVING.search(self.log_since(mark))
        if not m:
            return None
        host, _, port = m.group(1).rpartition(":")
        return host.strip("[]"), int(port)


@contextlib.asynccontextmanager
async def in_process_relay(rules: Path | str, spool: Path | str, *flags: str,
                           listen: str = "127.0.0.1:0", hostname: str = "relay.test"):
    """The relay of `routedsl serve RULES --spool SPOOL FLAGS...` started in this event loop."""
    from server.app import Relay, StartError
    from server.cli import config_from_args, serve_parser

    args = serve_parser().parse_args([str(rules), "--spool", str(spool), "--listen", listen,
                                      "--hostname", hostname, "--min-backoff", "1s",
                                      "--max-backoff", "2s", "--shutdown-timeout", "5s", *flags])
    relay = Relay(config_from_args(args))
    try:
        await relay.start()
    except StartError:
        await relay.stop()
        raise
    try:
        yield relay
    finally:
        await relay.stop()


def stable_port(host: str = "127.0.0.1") -> int:
    """A free port outside the kernel's ephemeral range.

    A restarted relay must get its port back. A port from the ephemeral range can be
    taken meanwhile by an outgoing connection, or by a client retrying a connection to the
    dead port (TCP self-connect), and the restart would fail with "address in use".
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low} on {host}")


def _accepts(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1):
            return True
    except OSError:
        return False
