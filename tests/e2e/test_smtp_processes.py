"""`routedsl serve --smtp-processes N`: SMTP intake in forked processes of its own.

What a mail administrator relies on: mail flows exactly as with in-process intake; the
limits hold for the relay as a whole; a stop is graceful and leaves no process behind; a
crash of the relay's process takes its intake processes with it, and a crash of an intake
process stops the relay (for its supervisor to restart) without losing what it accepted.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from server.intake_processes import SharedConnectionGate, _message_record, _read_message, shared_limits
from server.limits import Limits
from server.queue import QueuedMessage
from tests.e2e.conftest import message, send
from tests.support.fake_smtp import FakeSmtp
from tests.support.poll import until


def children(pid: int) -> list[int]:
    """Live (not zombie) child processes of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            state, ppid = stat[stat.rfind(")") + 2:].split()[:2]
            if int(ppid) == pid and state not in "ZX":
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


def two_process_relay(make_relay, sink: FakeSmtp, *flags: str, **options):
    """A relay (not started) with two SMTP intake processes, delivering everything to `sink`."""
    return make_relay(f"engine sink = smtp://127.0.0.3:{sink.port} tls none timeout 10s\n",
                      args=["--smtp-processes", "2", *flags], **options)


def test_a_record_carries_the_envelope_and_bytes_across():
    msg = QueuedMessage(id="0123456789ABCDEF0123", sender="a@b.test", recipients=("x@y.test", "z@y.test"),
                        size=5, arrival=1.5, smtputf8=True)
    record = _message_record(msg, b"hello")
    line, rest = record.split(b"\n", 1)
    assert _read_message(line + b"\n") == (msg, 5) and rest == b"hello"


def test_limits_counted_across_connections_are_shared_out():
    limits = shared_limits(Limits(max_connections=100, max_connections_per_ip=5, max_auth_failures_per_ip=1,
                                  max_data_memory=10_000, max_recipients=7), 2, max_size=8_000)
    assert limits.max_auth_failures_per_ip == 1     # never 0
    assert limits.max_data_memory == 8_000          # never less than one message of the size limit
    assert (limits.max_connections, limits.max_connections_per_ip) == (100, 5)   # counted in shared memory
    assert limits.max_recipients == 7               # per message: unchanged


def test_the_shared_gate_counts_connections_of_every_process():
    gate = SharedConnectionGate(max_total=3, max_per_ip=2)
    assert gate.acquire("127.0.0.1") is None
    pid = os.fork()
    if pid == 0:   # another intake process takes the second connection from the same address
        os._exit(0 if gate.acquire("127.0.0.1") is None else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert gate.acquire("127.0.0.1").startswith("421 4.7.0")      # third from one address
    assert gate.acquire("127.0.0.2") is None
    assert gate.acquire("127.0.0.4").startswith("421 4.3.2")      # fourth in all
    gate.release("127.0.0.1")
    assert gate.acquire("127.0.0.1") is None and gate.total == 3


async def test_mail_flows_through_intake_processes_and_a_stop_leaves_none_behind(make_relay):
    async with FakeSmtp("127.0.0.3") as sink:
        relay = two_process_relay(make_relay, sink)
        await relay.astart()
        assert relay.proc is not None
        intake = children(relay.proc.pid)
        assert len(intake) == 2, relay.log
        assert "smtp-processes=2" in relay.log
        # many connections, so the kernel spreads them over both processes
        ids = [f"<mp-{i}@load.test>" for i in range(40)]
        replies = await asyncio.gather(*(send(relay, "load@home.test", ["sink@example.net"],
                                              message("load@home.test", ["sink@example.net"], msgid=i))
                                         for i in ids))
        assert all(r.startswith("2.0.0 Ok: queued as") for r in replies), replies
        await until(lambda: len(sink.messages) >= len(ids), 15, "every message at the sink")
        assert sorted(m.header("Message-ID") for m in sink.messages) == sorted(ids)
        assert await relay.astop() == 0
    for pid in intake:
        assert not alive(pid), f"intake process {pid} outlived the relay"
    assert "Traceback" not in relay.log


async def test_the_connection_limit_per_ip_holds_for_the_relay_as_a_whole(make_relay):
    relay = make_relay("engine sink = smtp://127.0.0.3:9 tls none\n",
                       args=["--smtp-processes", "2", "--max-connections-per-ip", "4"])
    await relay.astart()
    assert relay.address is not None
    held: list[socket.socket] = []

    def greet() -> str:
        sock = socket.create_connection(relay.address, timeout=10)
        reply = sock.makefile("rb").readline().decode()
        if reply.startswith("220"):
            held.append(sock)
        else:
            sock.close()
        return reply

    try:
        # up to the limit (a start-up probe's connection may still be counted for a moment)
        await until(lambda: greet() and len(held) >= 4, 10, "four connections welcomed")
        assert len(held) == 4
        refusals = [await asyncio.to_thread(greet) for _ in range(10)]
        assert all(r.startswith("421 4.7.0") for r in refusals), refusals   # whichever process took them
        assert len(held) == 4
        held.pop().close()
        await until(lambda: greet().startswith("220"), 10, "a free place once one connection closed")
    finally:
        for sock in held:
            sock.close()
        await relay.astop()


async def test_killing_the_relay_kills_its_intake_processes_and_a_restart_delivers(make_relay):
    async with FakeSmtp("127.0.0.3") as sink:
        sink.fail("MAIL", "421 4.3.2 try later")     # keep the first message queued
        relay = two_process_relay(make_relay, sink)
        await relay.astart()
        assert relay.proc is not None
        intake = children(relay.proc.pid)
        await send(relay, "a@home.test", ["sink@example.net"],
                   message("a@home.test", ["sink@example.net"], msgid="<queued@load.test>"))
        await relay.akill()
        await until(lambda: not any(alive(p) for p in intake), 10, "the intake processes to die with the relay")
        sink.heal()
        await relay.astart()
        await until(lambda: sink.messages, 15, "the queued message after the restart")
        assert sink.messages[0].header("Message-ID") == "<queued@load.test>"
        await relay.astop()


async def test_a_dead_intake_process_stops_the_relay_for_its_supervisor(make_relay):
    async with FakeSmtp("127.0.0.3") as sink:
        relay = two_process_relay(make_relay, sink)
        await relay.astart()
        assert relay.proc is not None
        victim, survivor = children(relay.proc.pid)
        os.kill(victim, signal.SIGKILL)
        code = await asyncio.to_thread(relay.proc.wait, 15)
        assert code == 1, relay.log
        await until(lambda: not alive(survivor), 10, "the other intake process to stop too")
        assert f"SMTP intake process {victim} ended" in relay.log
        await relay.astart()        # the supervisor's restart on the same spool works
        await send(relay, "a@home.test", ["sink@example.net"],
                   message("a@home.test", ["sink@example.net"], msgid="<after@load.test>"))
        await until(lambda: sink.messages, 15, "mail after the restart")
        await relay.astop()


def test_a_rules_file_with_errors_starts_no_intake_process(make_relay):
    relay = make_relay("engine sink = smtp://127.0.0.3:9 tls none\nif destination is then try sink first\n",
                       args=["--smtp-processes", "2"])
    with pytest.raises(AssertionError) as failed:
        relay.start(timeout=10)
    assert "refusing to start" in str(failed.value)
    assert relay.proc is not None and relay.proc.returncode == 1
    assert not children(relay.proc.pid)


def test_smtp_processes_must_be_a_small_number(make_relay):
    relay = make_relay("engine sink = smtp://127.0.0.3:9 tls none\n", args=["--smtp-processes", "many"])
    with pytest.raises(AssertionError) as failed:
        relay.start(timeout=10)
    assert "--smtp-processes: 'many' is not a number from 0 to 64" in str(failed.value)


async def test_the_queue_limit_holds_when_the_intake_runs_in_its_own_processes(make_relay):
    async with FakeSmtp("127.0.0.3") as sink:
        sink.fail("MAIL", "451 4.3.0 not now")      # every message stays queued
        relay = two_process_relay(make_relay, sink, "--max-queue-messages", "2",
                                  min_backoff="1h", max_backoff="2h")
        await relay.astart()
        for i in range(2):
            await send(relay, "a@home.test", ["sink@example.net"],
                       message("a@home.test", ["sink@example.net"], msgid=f"<q{i}@load.test>"))

        async def refused() -> bool:
            try:
                await send(relay, "a@home.test", ["sink@example.net"],
                           message("a@home.test", ["sink@example.net"], msgid="<over@load.test>"))
            except Exception as exc:   # the queue's size reaches the intake processes within a second
                return "452" in str(exc)
            return False

        deadline = asyncio.get_running_loop().time() + 10
        while not await refused():
            assert asyncio.get_running_loop().time() < deadline, relay.log
        assert "queue full" in relay.log
        await relay.astop()


def connections_held_by(pid: int, port: int) -> int:
    """Established TCP connections on local `port` whose socket `pid` holds open."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":   # ESTABLISHED
                inodes.add(fields[9])
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held += 1
    return held


async def test_long_lived_sessions_are_spread_evenly_over_the_intake_processes(make_relay):
    relay = make_relay("engine sink = smtp://127.0.0.3:9 tls none\n", args=["--smtp-processes", "2"])
    await relay.astart()
    assert relay.address is not None and relay.proc is not None
    held: list[socket.socket] = []

    def connect() -> None:
        sock = socket.create_connection(relay.address, timeout=10)
        held.append(sock)
        assert sock.makefile("rb").readline().startswith(b"220")

    try:
        for _ in range(20):
            await asyncio.to_thread(connect)
        shares = sorted(connections_held_by(pid, relay.address[1]) for pid in children(relay.proc.pid))
    finally:
        for sock in held:
            sock.close()
        await relay.astop()
    assert sum(shares) == 20 and shares[0] >= 9, shares   # not 14 of 20 on one, as a port hash did
