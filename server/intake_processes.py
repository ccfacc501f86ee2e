"""SMTP intake in processes of their own: `routedsl serve --smtp-processes N`.

One event loop tops out at about one core, and the SMTP conversations are most of the
relay's CPU. With N > 0 they run in N forked processes; the relay's own process keeps
everything else (the spool's lock and index, scheduler, engines, reload, metrics).
This module owns:

  * start-up, `fork_intake` (called before any event loop or thread exists): the listen
    addresses are bound, then the children forked; they share the listening sockets. A
    child waits for the word `go`, which the relay sends only once its spool is locked and
    recovered and its scheduler runs.
  * spreading the connections (`_FairAcceptor`): a child accepts only while it holds no
    more connections than the least loaded child plus one (or once it has waited
    FAIR_WAIT for the others), so long-lived sessions spread evenly; SO_REUSEPORT's hash
    put 14 of 20 on one process.
  * the child (`_Child`): the same hardened listener and `Intake` as in-process intake,
    over a commit-only spool (`Spool.open_for_intake`) that hands each message, once it
    is durable and before its `250`, to the relay's process: one record on a socket pair.
  * the relay's side (`IntakeProcesses`): each record becomes `spool.adopt` +
    `scheduler.wake`; the queue's size goes to the children once a second (for the queue
    limits); `drain()` at a stop: the children stop listening, answer every client already
    past its final dot, flush their records and exit.

Connections in all and per client IP are counted in memory shared by every process
(`SharedConnectionGate`), so those limits hold exactly as with one process; AUTH failures
per IP and DATA memory are divided among the processes, so the relay as a whole never goes
over them. A child that dies stops the relay (exit code 1), like a failed scheduler: a
supervisor restarts it on the same spool, and every message a child acknowledged is on
disk (recovered at start-up if its record was lost). Children die with the relay's
process (PR_SET_PDEATHSIG) and when their socket pair closes.

Records, child -> relay: `M <bytes sent> <envelope JSON>\n` then those bytes (none for a
message over HANDOVER_DATA_LIMIT: its first attempt reads the file); `R <refused total>\n`.
Relay -> child: `go\n`, `Q <messages> <bytes>\n`, `stop\n`.
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
import zlib
from typing import Any, Callable, NoReturn, Optional

from server.config import Address, ServeConfig
from server.limits import Limits
from server.queue import QueuedMessage, envelope_line, parse_envelope

log = logging.getLogger("routedsl.intake")

HANDOVER_DATA_LIMIT = 1024 * 1024   # larger messages are read from the spool by their first attempt
USAGE_INTERVAL = 1.0                # seconds between queue-size updates to the children
FAIR_WAIT = 0.05                    # longest a child leaves new connections to less loaded ones
_RECORD_LIMIT = 64 * 1024 * 1024    # longest record line (an envelope with many recipients)
_PR_SET_PDEATHSIG = 1

Listeners = tuple[list[socket.socket], list[socket.socket]]   # plain, implicit TLS


# ---------------------------------------------------------------- records

def _message_record(msg: QueuedMessage, data: bytes) -> bytes:
    # the spool file's own envelope line; its checksum is the file's business, not the record's
    body = data if len(data) <= HANDOVER_DATA_LIMIT else b""
    return b"M %d %s%s" % (len(body), envelope_line(msg, ""), body)


def _read_message(line: bytes) -> tuple[QueuedMessage, int]:
    _, sent, envelope = line.split(b" ", 2)
    return parse_envelope(envelope)[0], int(sent)


def shared_limits(limits: Limits, processes: int, max_size: int) -> Limits:
    """Each process's share of the limits counted across connections that are not shared
    (AUTH failures per IP, DATA memory)."""
    return dataclasses.replace(
        limits,
        max_auth_failures_per_ip=max(1, limits.max_auth_failures_per_ip // processes),
        max_data_memory=max(max_size, limits.max_data_memory // processes))


class SharedConnectionGate:
    """`server.smtp.ConnectionGate` for several processes: the open connections in all and
    per client IP, counted in anonymous shared memory made before the fork.

    A client IP is counted in one of BUCKETS counters chosen by a stable hash (crc32): two
    clients share a counter only on a collision, which can only make the limit stricter for
    them, never looser. Each process's own open connections are counted too (`me`, set in
    the child), for `_FairAcceptor`. A process that dies takes its counts with it only by
    stopping the relay, which a dead intake process does.
    """
    BUCKETS = 1 << 16

    def __init__(self, max_total: int, max_per_ip: int, processes: int = 1) -> None:
        import mmap
        import multiprocessing
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.processes = processes
        self.me = 0
        self._memory = mmap.mmap(-1, 4 * (1 + self.BUCKETS + processes))   # MAP_SHARED | MAP_ANONYMOUS
        # [0]: total; [1 + bucket]: per IP; [1 + BUCKETS + process]: per intake process
        self._counts = memoryview(self._memory).cast("i")
        self._own = 1 + self.BUCKETS
        self._lock = multiprocessing.get_context("fork").Lock()

    def _bucket(self, ip: str) -> int:
        return 1 + zlib.crc32(ip.encode()) % self.BUCKETS

    @property
    def total(self) -> int:
        return self._counts[0]

    def acquire(self, ip: str) -> Optional[str]:
        """None when the connection may go on, else the reply that refuses it."""
        bucket, counts = self._bucket(ip), self._counts
        with self._lock:
            if counts[0] >= self.max_total:
                return "421 4.3.2 Service busy, too many connections; try again later"
            if counts[bucket] >= self.max_per_ip:
                return "421 4.7.0 Too many connections from your address; try again later"
            counts[0] += 1
            counts[bucket] += 1
            counts[self._own + self.me] += 1
        return None

    def release(self, ip: str) -> None:
        bucket, counts = self._bucket(ip), self._counts
        with self._lock:
            counts[0] -= 1
            counts[bucket] -= 1
            counts[self._own + self.me] -= 1

    def my_turn(self) -> bool:
        """True while this process holds no more connections than the least loaded one + 1."""
        own = self._counts[self._own:self._own + self.processes]
        return own[self.me] <= min(own) + 1


class _FairAcceptor:
    """Accepts on a listening socket shared with the other intake processes, in turn with
    them (`SharedConnectionGate.my_turn`), and starts a session on each connection; stands
    where an asyncio Server would (`close()`, `sockets`)."""

    def __init__(self, gate: SharedConnectionGate, factory: Callable[[], asyncio.Protocol], *,
                 sock: socket.socket, ssl: Any = None, ssl_handshake_timeout: Optional[float] = None) -> None:
        self.sockets = [sock]
        self._gate = gate
        self._factory = factory
        self._ssl = ssl
        self._handshake_timeout = ssl_handshake_timeout
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.sockets[0]
        while True:
            waited = 0.0
            while not self._gate.my_turn() and waited < FAIR_WAIT:
                await asyncio.sleep(0.002)   # the others are woken by the same connection
                waited += 0.002
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:   # e.g. EMFILE: let connections wait rather than spin
                log.error("accepting a connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if self._ssl is None:
                await self._start(conn)
            else:   # the TLS handshake must not hold up the next accept
                loop.create_task(self._start(conn))

    async def _start(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                self._factory, conn, ssl=self._ssl, ssl_handshake_timeout=self._handshake_timeout)
        except Exception as exc:   # a client gone at once, a failed handshake: its own problem
            log.debug("connection not started: %s", exc)
            conn.close()

    def close(self) -> None:
        self._task.cancel()

    @classmethod
    def server_maker(cls, gate: SharedConnectionGate) -> Callable[..., Any]:
        """`loop.create_server`'s stand-in for `start_listeners(serve=...)`."""
        async def create(factory: Callable[[], asyncio.Protocol], **kwargs: Any) -> "_FairAcceptor":
            return cls(gate, factory, **kwargs)
        return create


# ---------------------------------------------------------------- start-up (before any loop)

def _bind(address: Optional[Address]) -> list[socket.socket]:
    """Listening sockets on every address `address` names, as create_server binds them
    (`localhost` may be 127.0.0.1 and ::1). None: no sockets."""
    if address is None:
        return []
    infos = dict.fromkeys((family, kind, proto, where) for family, kind, proto, _, where in socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, where in infos:
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(where)
            sock.listen(100)
            sock.setblocking(False)
    except BaseException:
        _close(socks)
        raise
    return socks


def _close(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def fork_intake(config: ServeConfig) -> "IntakeProcesses":
    """Bind the listen addresses and fork `config.smtp_processes` children that wait for
    `go`. Must run before any event loop or thread exists. Raises ListenerError for an
    unusable TLS or users setting, OSError when an address cannot be bound."""
    from server.smtp import listener_security

    # What a child would find wrong at start-up is found here, once, before any binding.
    tls_context, _users = listener_security(config)
    count = config.smtp_processes
    limits = config.limits or Limits()
    gate = SharedConnectionGate(limits.max_connections, limits.max_connections_per_ip, count)
    plain = _bind(config.listen)
    try:
        implicit = _bind(config.listen_tls)
    except BaseException:
        _close(plain)
        raise
    addresses = [Address(*s.getsockname()[:2]) for s in (*plain, *implicit)]
    # What the children run is imported now, so its pages stay shared after the fork.
    import server.intake  # noqa: F401
    import server.smtp  # noqa: F401
    try:
        import uvloop  # noqa: F401  (app.run_loop's loop, when installed)
    except ImportError:
        pass
    parent = os.getpid()
    children: list[_ChildProcess] = []
    gc.freeze()   # the collector would touch (and so copy) every object the children share
    try:
        for i in range(count):
            ours, theirs = socket.socketpair()
            pid = os.fork()
            if pid == 0:   # the child: the listeners and its own end of the pair only
                _close([*(c.channel for c in children), ours])
                gate.me = i
                _child_main(config, (plain, implicit), tls_context, gate, theirs, parent)
            theirs.close()
            children.append(_ChildProcess(pid, ours))
    except BaseException:
        for child in children:
            child.kill()
        raise
    finally:
        gc.unfreeze()
        _close([*plain, *implicit])   # the children listen
    return IntakeProcesses(children, addresses)


# ---------------------------------------------------------------- the child

def _child_main(config: ServeConfig, listeners: Listeners, tls_context: Any,
                gate: SharedConnectionGate, channel: socket.socket, parent: int) -> NoReturn:
    code = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:   # the relay died before the line above
            os._exit(1)
        # The relay's process decides when to stop: a terminal's Ctrl-C or hang-up reaches
        # the whole process group, and a child must not stop on its own.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        from server.app import log_from_thread, run_loop

        async def child() -> int:
            stop_logging = log_from_thread()
            try:
                return await _Child(config, listeners, tls_context, gate, channel).run()
            finally:
                stop_logging()
        code = run_loop(child())
    except BaseException:
        log.exception("SMTP intake process failed")
    finally:
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)


class _Child:
    def __init__(self, config: ServeConfig, listeners: Listeners, tls_context: Any,
                 gate: SharedConnectionGate, channel: socket.socket) -> None:
        self.config = config
        self.listeners = listeners
        self.tls_context = tls_context
        self.gate = gate
        self.channel = channel
        self.usage = (0, 0)
        self.writer: Optional[asyncio.StreamWriter] = None

    def _tell(self, msg: QueuedMessage, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(_message_record(msg, data))

    async def run(self) -> int:
        from server.intake import Intake
        from server.queue import Spool
        from server.smtp import AuthLimiter, DataBudget, ListenerState, start_listeners

        cfg = self.config
        reader, self.writer = await asyncio.open_unix_connection(sock=self.channel, limit=_RECORD_LIMIT)
        if await reader.readline() != b"go\n":
            return 0   # the relay did not start (or stopped before it did)
        spool = Spool(cfg.spool)
        spool.open_for_intake(self._tell)
        handler = Intake(spool, hostname=cfg.hostname)
        limits = shared_limits(cfg.limits or Limits(), cfg.smtp_processes, cfg.max_size)
        state = ListenerState(gate=self.gate,  # type: ignore[arg-type]  (the same interface)
                              auth_limiter=AuthLimiter(limits.max_auth_failures_per_ip, limits.auth_failure_window),
                              data_budget=DataBudget(limits.max_data_memory))
        servers = await start_listeners(handler, dataclasses.replace(cfg, limits=limits),
                                        sockets=self.listeners, tls_context=self.tls_context,
                                        state=state, queue_usage=lambda: self.usage,
                                        serve=_FairAcceptor.server_maker(self.gate))
        gc.freeze()   # as the relay's process does after start-up (server/app.py serve)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        listening = asyncio.create_task(self._listen(reader, handler, stop))
        await stop.wait()
        for server in servers:
            server.close()
        await handler.drain(cfg.shutdown_timeout)
        listening.cancel()
        self.writer.write(b"R %d\n" % handler.refused)
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), cfg.shutdown_timeout)
        except (OSError, asyncio.TimeoutError):
            pass   # the relay is gone: what was acknowledged is on disk for its next start
        await asyncio.to_thread(spool.close)
        return 0

    async def _listen(self, reader: asyncio.StreamReader, handler: Any, stop: asyncio.Event) -> None:
        """The relay's words: queue size (answered with our refusal count) until `stop` or EOF."""
        assert self.writer is not None
        try:
            while (line := await reader.readline()).startswith(b"Q "):
                _, messages, size = line.split()
                self.usage = (int(messages), int(size))
                self.writer.write(b"R %d\n" % handler.refused)
        finally:
            stop.set()


# ---------------------------------------------------------------- the relay's side

@dataclasses.dataclass
class _ChildProcess:
    pid: int
    channel: socket.socket
    writer: Optional[asyncio.StreamWriter] = None
    refused: int = 0
    exit_code: Optional[int] = None

    def send(self, line: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(line)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class IntakeProcesses:
    """The relay's handle on its SMTP intake processes (in the place of the in-process
    Intake handler: `accepted`, `refused`, `drain`)."""

    def __init__(self, children: list[_ChildProcess], addresses: list[Address]) -> None:
        self.children = children
        self.addresses = addresses
        self.accepted = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._usage: Optional[asyncio.Task[None]] = None
        self._stopping = False

    @property
    def refused(self) -> int:
        return sum(c.refused for c in self.children)

    async def start(self, spool: Any, on_accepted: Callable[[QueuedMessage], None]) -> None:
        """Let the children listen; their messages go to `spool.adopt` and `on_accepted`."""
        for child in self.children:
            reader, child.writer = await asyncio.open_unix_connection(sock=child.channel, limit=_RECORD_LIMIT)
            child.send(b"go\n")
            self._tasks.append(asyncio.create_task(self._serve(child, reader, spool, on_accepted),
                                                   name=f"SMTP intake process {child.pid}"))
        self._usage = asyncio.create_task(self._send_usage(spool))

    async def watch(self) -> None:
        """Returns (or raises) when a child has ended or its records cannot be read: the
        relay then stops, unless it is stopping already."""
        if self._tasks:
            done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()   # type: ignore[misc]
        for child in self.children:
            if child.exit_code is not None and not self._stopping:
                log.error("SMTP intake process %d ended with exit code %d", child.pid, child.exit_code)

    async def _serve(self, child: _ChildProcess, reader: asyncio.StreamReader, spool: Any,
                     on_accepted: Callable[[QueuedMessage], None]) -> None:
        try:
            while line := await reader.readline():
                if line.startswith(b"M "):
                    msg, sent = _read_message(line)
                    data = await reader.readexactly(sent) if sent else None
                    spool.adopt(msg, data)
                    self.accepted += 1
                    try:
                        on_accepted(msg)
                    except Exception:   # durable and indexed: the scheduler's own scan finds it
                        log.exception("%s: could not wake the scheduler", msg.id)
                elif line.startswith(b"R "):
                    child.refused = int(line.split()[1])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass   # the child died mid-record; the message is on disk for the next start
        child.exit_code = await _exit_code(child.pid)

    async def _send_usage(self, spool: Any) -> None:
        while True:
            line = b"Q %d %d\n" % (len(spool), spool.total_bytes)
            for child in self.children:
                child.send(line)
            await asyncio.sleep(USAGE_INTERVAL)

    async def drain(self, timeout: float) -> bool:
        """Stop the children: no new connections, every client past its final dot answered,
        their records read. Children still running after `timeout` are killed (what they
        acknowledged is on disk). True when all stopped in time."""
        self._stopping = True
        if self._usage is not None:
            self._usage.cancel()
        for child in self.children:
            if self._tasks:
                child.send(b"stop\n")
            else:   # never started: the child still waits for `go`
                try:
                    child.channel.sendall(b"stop\n")
                except OSError:
                    pass   # already gone
        if not self._tasks:
            self._tasks = [asyncio.create_task(_reap(c)) for c in self.children]
        done, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for child in self.children:
            if child.exit_code is None:
                child.kill()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        for child in self.children:
            if child.writer is not None:
                child.writer.close()
            child.channel.close()
        return not pending


async def _reap(child: _ChildProcess) -> None:
    child.exit_code = await _exit_code(child.pid)


async def _exit_code(pid: int) -> int:
    """Wait for a child to end (pidfd readable) and reap it."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = -1
    if fd >= 0:
        ended = loop.create_future()
        loop.add_reader(fd, lambda: ended.done() or ended.set_result(None))
        try:
            await ended
        finally:
            loop.remove_reader(fd)
            os.close(fd)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return -1
    return os.waitstatus_to_exitcode(status)
