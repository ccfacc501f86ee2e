"""A private Postfix instance on a loopback port, for interop tests and benchmarks.

Owns: writing a self-contained ``main.cf``/``master.cf`` under a scratch folder (own config,
queue, data and log folders; no chroot; loopback only; IPv4 only; no local delivery), starting
it with ``postfix -c CONFDIR start``, waiting until it answers SMTP, and stopping it with
``postfix -c CONFDIR stop`` until the master's pid file is gone. The same instance serves as
a plain relay (``next_hop`` = the sink it forwards everything to) or as a receiving smarthost
for routedsl (optionally offering STARTTLS with a certificate the test made).

Never: touches the system instance in ``/etc/postfix``, listens outside 127.0.0.0/8, or is
left running by a caller that used it as a context manager (sync ``with`` or ``async with``).

    with PrivatePostfix(tmp_path / "pf", next_hop=("127.0.0.1", sink_port)) as pf:
        smtp_to(pf.host, pf.port)                  # relayed to the sink

Needs root (Postfix's master runs as root and drops to the ``postfix`` user).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

log = logging.getLogger("routedsl.tests.postfix")

POSTFIX = "/usr/sbin/postfix"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

# Every service a relay needs, chroot column "n" (the queue lives in a scratch folder).
# The smtpd line is added per instance with its own listen address.
_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(RuntimeError):
    """The private instance could not be configured, started or stopped; the message says why."""


def wait_for_banner(host: str, port: int, seconds: float) -> None:
    """Poll until ``host:port`` greets with 220; raise TimeoutError with the last error."""
    deadline = time.monotonic() + seconds
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"no SMTP banner on {host}:{port}: {last}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (Postfix cannot listen on port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped has finished running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] not in ("Z", "X")


def postfix_available() -> bool:
    """True when Postfix is installed and we may start it (root): tests skip otherwise."""
    return os.path.exists(POSTFIX) and os.geteuid() == 0


@dataclasses.dataclass(frozen=True)
class ProcessUsage:
    """What the instance's processes use right now: for the benchmark's CPU and memory figures."""

    pids: tuple[int, ...]
    cpu_seconds: float          # utime + stime of the live processes + the master's reaped children
    pss_bytes: int              # summed proportional set size (smaps_rollup)
    rss_bytes: int              # summed resident set size (overstates shared pages)


class PrivatePostfix:
    """One private Postfix instance rooted at ``root`` (created if missing).

    ``root`` None: a fresh folder in the system temp folder, deleted again by ``stop()``.
    The ``postfix`` user must be able to walk down to ``root``, so pytest's ``tmp_path``
    (inside a folder only root may enter) does not work: leave ``root`` None in tests.

    ``next_hop``: (host, port) every message is relayed to (``relayhost = [host]:port``);
    None keeps accepted mail queued on hold (a smarthost that only receives).
    ``tls_cert``/``tls_key``: PEM files; when given, smtpd offers STARTTLS
    (``require_tls`` makes it mandatory before MAIL). ``main_cf``: extra or overriding
    ``main.cf`` settings. ``port`` defaults to a free one.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        next_hop: tuple[str, int] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        require_tls: bool = False,
        main_cf: Mapping[str, str] | None = None,
    ) -> None:
        if not host.startswith("127."):
            raise PostfixError(f"refusing to listen outside loopback: {host}")
        if (tls_cert is None) != (tls_key is None):
            raise PostfixError("tls_cert and tls_key go together")
        if require_tls and tls_cert is None:
            raise PostfixError("require_tls needs tls_cert and tls_key")
        self._own_root = root is None
        self.root = (
            Path(tempfile.mkdtemp(prefix="routedsl-postfix-")) if root is None
            else Path(root).resolve()
        )
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.next_hop = next_hop
        self.tls_cert = Path(tls_cert).resolve() if tls_cert is not None else None
        self.tls_key = Path(tls_key).resolve() if tls_key is not None else None
        self.require_tls = require_tls
        self.extra_main = dict(main_cf or {})
        self.config_dir = self.root / "conf"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.log_file = self.root / "log" / "postfix.log"
        self._running = False

    # -- configuration -------------------------------------------------------------------

    def main_settings(self) -> dict[str, str]:
        """The ``main.cf`` this instance runs with (defaults, then the caller's overrides)."""
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "myhostname": "postfix.test",
            "mydomain": "postfix.test",
            "myorigin": "postfix.test",
            "mydestination": "",
            "local_transport": "error:5.1.1 no local delivery",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "biff": "no",
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.log_file.parent),
            "message_size_limit": "52428800",
            "smtputf8_enable": "yes",
        }
        if self.next_hop is not None:
            nh_host, nh_port = self.next_hop
            if not nh_host.startswith("127."):
                raise PostfixError(f"refusing to relay outside loopback: {nh_host}")
            settings["relayhost"] = f"[{nh_host}]:{nh_port}"
        else:
            # Receive only: keep every accepted message on hold where a test can inspect it.
            settings["smtpd_end_of_data_restrictions"] = "check_client_access static:HOLD"
            settings["defer_transports"] = "smtp, relay"    # and never try to send it on
        if self.tls_cert is not None:
            settings["smtpd_tls_cert_file"] = str(self.tls_cert)
            settings["smtpd_tls_key_file"] = str(self.tls_key)
            settings["smtpd_tls_security_level"] = "encrypt" if self.require_tls else "may"
        else:
            settings["smtpd_tls_security_level"] = "none"
        settings["smtp_tls_security_level"] = "none"
        settings.update(self.extra_main)
        return settings

    def _check_reachable(self) -> None:
        """Postfix's services run as ``postfix``: every folder above ours must let it pass."""
        for folder in [self.root, *self.root.parents]:
            if folder.exists() and not folder.stat().st_mode & stat.S_IXOTH:
                raise PostfixError(
                    f"the postfix user cannot enter {folder} (mode "
                    f"{stat.filemode(folder.stat().st_mode)}); put the instance elsewhere "
                    f"or leave root unset"
                )

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self._check_reachable()
        for folder in (self.config_dir, self.queue_dir, self.data_dir, self.log_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.queue_dir, 0, 0)
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        os.chmod(self.queue_dir, 0o755)
        os.chmod(self.data_dir, 0o700)
        main = "".join(f"{k} = {v}\n" for k, v in self.main_settings().items())
        (self.config_dir / "main.cf").write_text(main)
        smtpd = f"{self.host}:{self.port} inet n - n - - smtpd\n"
        (self.config_dir / "master.cf").write_text(smtpd + _SERVICES)

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def pid_file(self) -> Path:
        return self.queue_dir / "pid" / "master.pid"

    def master_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _postfix(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [POSTFIX, "-c", str(self.config_dir), *args],
                capture_output=True, text=True, timeout=timeout, check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostfixError(f"postfix {' '.join(args)}: {exc}") from exc

    def start(self) -> None:
        """Write the configuration, start the instance and wait until it answers SMTP."""
        if not postfix_available():
            raise PostfixError("postfix is not installed or we are not root")
        if self._running:
            return
        # From here on stop() must run on failure: a half-started master, or our own folder.
        self._running = True
        try:
            self._write_config()
            result = self._postfix("start", timeout=START_TIMEOUT)
            if result.returncode != 0:
                raise PostfixError(
                    f"postfix start failed ({result.returncode}): "
                    f"{(result.stderr or result.stdout).strip()}\n{self.log_tail()}"
                )
            self._wait_for_banner(time.monotonic() + START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        log.info("private postfix up on %s:%d (root %s)", self.host, self.port, self.root)

    def _wait_for_banner(self, deadline: float) -> None:
        try:
            wait_for_banner(self.host, self.port, deadline - time.monotonic())
        except TimeoutError as exc:
            raise PostfixError(f"{exc}\n{self.log_tail()}") from None

    def stop(self) -> None:
        """Stop the instance and wait until its master has exited (kill it if it will not).

        Postfix leaves ``master.pid`` in place after a clean stop, so "gone" means the pid in
        it no longer names a live process of this instance (a zombie counts as gone).
        """
        if not self._running:
            self._remove_own_root()
            return
        pids = self.pids()
        self._postfix("stop", timeout=STOP_TIMEOUT)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in pids:
            if _alive(pid):
                log.warning("postfix process %d did not stop in time; killing it", pid)
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        self._running = False
        self._remove_own_root()

    def _remove_own_root(self) -> None:
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivatePostfix:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> PrivatePostfix:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    def remove(self) -> None:
        """Delete the scratch folder (after stop)."""
        if self._running:
            raise PostfixError("stop the instance before removing it")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- inspection ----------------------------------------------------------------------

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no postfix log)"

    def queue_counts(self) -> dict[str, int]:
        """Messages per queue folder: maildrop, incoming, active, deferred, hold."""
        counts = {}
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            counts[name] = sum(len(files) for _d, _s, files in os.walk(self.queue_dir / name))
        return counts

    def queue_count(self) -> int:
        """Messages still in the instance's queue (every folder together)."""
        return sum(self.queue_counts().values())

    def pids(self) -> tuple[int, ...]:
        """The master and every process whose parent is the master (its services)."""
        master = self.master_pid()
        if master is None or not _alive(master):
            return ()
        found = [master]
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The command name may contain spaces: fields start after the last ')'.
            fields = stat[stat.rfind(")") + 2:].split()
            if int(fields[1]) == master and fields[0] not in ("Z", "X"):
                found.append(int(entry))
        return tuple(found)

    def usage(self) -> ProcessUsage:
        """CPU seconds and memory of the live processes of this instance."""
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = 0.0
        pss = rss = 0
        pids = self.pids()
        master = pids[0] if pids else None
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            cpu += (int(fields[11]) + int(fields[12])) / ticks
            if pid == master:
                # Services that already exited were reaped by the master: their CPU is here.
                cpu += (int(fields[13]) + int(fields[14])) / ticks
            for line in rollup.splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
        return ProcessUsage(pids=pids, cpu_seconds=cpu, pss_bytes=pss, rss_bytes=rss)

