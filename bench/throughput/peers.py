"""Postfix's load tools as benchmark parts: the smtp-sink counter and the smtp-source load.

Owns: installing the Debian package that brings them when missing, running ``smtp-sink``
with one reader thread that timestamps every counter update, and running ``smtp-source``
bounded in time.
Never: reads a child's output from more than one reader (counters would be lost), or leaves
a process it started running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import threading
import time

from tests.support.postfix import free_port, wait_for_banner  # noqa: F401 (re-exported)

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
POSTFIX = "/usr/sbin/postfix"


def ensure_packages() -> None:
    """Install Debian's ``postfix`` (smtp-source, smtp-sink, postfix) when it is missing.

    The system instance stays unconfigured and stopped ("No configuration").
    """
    if all(os.path.exists(p) for p in (SMTP_SINK, SMTP_SOURCE, POSTFIX)):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["debconf-set-selections"], input="postfix postfix/main_mailer_type select No configuration\n",
        text=True, check=True, env=env,
    )
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "postfix"], check=True, env=env)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process we started, then SIGKILL it if it lingers; always reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


_MESG = re.compile(rb"mesg=(\d+)")


class SmtpSink:
    """``smtp-sink -u nobody -c`` on a loopback port, counting messages as they arrive.

    One thread reads the counter lines and records when each new count was first seen, so
    ``time_of(n)`` is when the n-th message was accepted by the sink.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self.count = 0
        self._times: list[float] = []          # _times[n-1]: when the count reached n

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", "-c", f"{self.host}:{self.port}", "256"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self._reader = threading.Thread(target=self._read, name="smtp-sink-reader", daemon=True)
        self._reader.start()
        try:
            wait_for_banner(self.host, self.port, 10)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        pending = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            now = time.monotonic()
            pending += chunk
            *records, pending = re.split(rb"[\r\n]", pending)
            for record in records:
                m = _MESG.search(record)
                if m:
                    n = int(m.group(1))
                    with self._lock:
                        while len(self._times) < n:
                            self._times.append(now)
                        self.count = max(self.count, n)

    def time_of(self, n: int) -> float | None:
        with self._lock:
            return self._times[n - 1] if 0 < n <= len(self._times) else None

    async def wait_for(self, n: int, seconds: float) -> bool:
        """Poll until ``n`` messages arrived or the deadline passed; True when they did."""
        deadline = time.monotonic() + seconds
        while self.count < n:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
        if self._reader is not None:
            self._reader.join(5)


@dataclasses.dataclass(frozen=True)
class SourceResult:
    started: float          # monotonic time smtp-source was launched
    finished: float         # monotonic time it exited
    returncode: int
    output: str


async def smtp_source(
    host: str, port: int, *, messages: int, sessions: int, size: int, reuse: bool,
    sender: str, recipient: str, timeout: float,
) -> SourceResult:
    """Run one ``smtp-source``; kill it (by its pid) if it outlives ``timeout`` seconds."""
    args = [SMTP_SOURCE, "-4", "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", sender, "-t", recipient, "-M", "source.test"]
    if reuse:
        args.append("-d")
    args.append(f"{host}:{port}")
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        return SourceResult(started, time.monotonic(), -9, f"(killed after {timeout:.0f}s)")
    finally:
        if proc.returncode is None:              # timed out or cancelled: stop it by its pid
            proc.kill()
            await proc.wait()
    return SourceResult(started, time.monotonic(), proc.returncode or 0, out.decode(errors="replace"))


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
