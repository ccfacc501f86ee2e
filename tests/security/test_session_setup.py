"""What the per-connection set-up of a session is cut down to still behaves the same: it
leaves the attributes aiosmtpd's own SMTP.__init__ leaves, HELP still reads each command's
syntax through the counting wrapper, the login mechanisms are bound to each session, and
the spool's free space is read at most once per second (the disk reserve at MAIL uses that
reading)."""
from __future__ import annotations

import asyncio
import collections
import itertools
import ssl
import weakref
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from server.access import RelayAccess
from server.intake import Intake
from server.limits import Limits
from server.smtp import AuthLimiter, ConnectionGate, DataBudget, RelaySMTP, spool_free_space
from tests.security.harness import Client, code, until


class _ByAiosmtpd(RelaySMTP):
    """The relay's session with aiosmtpd's own SMTP.__init__ doing the protocol's set-up."""
    command_size_limits = collections.defaultdict(lambda: 512)   # SMTP.__init__ clears it
    _auth_methods = None   # SMTP.__init__ assigns it                      # type: ignore[assignment]

    def _protocol_state(self, handler: Any, **kw: Any) -> None:
        SMTP.__init__(self, handler, enable_SMTPUTF8=True, ident="routedsl", **kw)


async def test_the_session_is_set_up_as_aiosmtpd_sets_it_up():
    handler = Intake(spool=None, hostname="relay.test")   # type: ignore[arg-type]
    limits = Limits(idle_timeout=123.0)
    shared = dict(limits=limits, access=RelayAccess.from_cidrs(()), hostname="relay.test", max_size=4321,
                  gate=ConnectionGate(5, 5), auth_limiter=AuthLimiter(3, 60.0), data_budget=DataBudget(10**6),
                  loop=asyncio.get_running_loop())
    tls_server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for implicit_tls, tls in itertools.product((False, True), (None, tls_server)):
        ours, theirs = (cls(handler, tls_context=tls, implicit_tls=implicit_tls, **shared)
                        for cls in (RelaySMTP, _ByAiosmtpd))
        mine, ref = vars(ours), vars(theirs)
        assert set(mine) == set(ref) - {"_auth_methods"}
        for name, value in ref.items():
            if name == "_auth_methods":
                table = ours._auth_methods
                assert set(table) == set(value) == {"LOGIN", "PLAIN"}
                for mechanism, impl in value.items():
                    assert table[mechanism].is_builtin == impl.is_builtin
                    assert table[mechanism].method.__func__ is impl.method.__func__
                    assert table[mechanism].method.__self__ is ours
            elif name == "_smtp_methods":
                assert set(mine[name]) == set(value)
                for command, method in value.items():
                    assert mine[name][command]._method.__func__ is method.__func__
                    assert mine[name].get(command)._method.__self__ is ours
                assert mine[name].get("NOSUCH") is None
            elif name == "_handle_hooks":
                assert mine[name] == value
            elif isinstance(value, weakref.ref):
                assert type(mine[name]()) is type(value()) and mine[name]()._limit == value()._limit
            elif isinstance(value, (asyncio.StreamReader, asyncio.Future)):
                assert type(mine[name]) is type(value)
                assert getattr(mine[name], "_limit", None) == getattr(value, "_limit", None)
            elif callable(value) and hasattr(value, "__func__"):
                assert mine[name].__func__ is value.__func__ and mine[name].__self__ is ours
            else:
                assert mine[name] == value, name
        assert ours.command_size_limits["MAIL"] == 562 and ours.command_size_limits["XYZ"] == 512
        assert "XYZ" not in ours.command_size_limits   # looking a command up never adds it


async def test_help_names_the_commands_and_their_syntax(relays):
    relay = await relays()
    client = await Client.connect(relay.port)
    await client.cmd(b"EHLO c.test")
    assert code(await client.cmd(b"HELP MAIL")).startswith("250")
    reply = await client.cmd(b"HELP MAIL")
    assert b"MAIL FROM: <address>" in reply
    listing = await client.cmd(b"HELP")
    assert b"RCPT" in listing and b"DATA" in listing
    await client.cmd(b"QUIT")


async def test_each_session_gets_its_own_bound_login_mechanisms(relays):
    relay = await relays()
    one = await Client.connect(relay.port)
    two = await Client.connect(relay.port)
    sessions = [p for p in _sessions()]
    assert len(sessions) >= 2
    for s in sessions:
        mechanisms = {name for name in s._auth_methods}
        assert {"LOGIN", "PLAIN"} <= mechanisms
        for impl in s._auth_methods.values():
            if impl.is_builtin:
                assert impl.method.__self__ is s    # bound to this session, not another
    await one.cmd(b"QUIT")
    await two.cmd(b"QUIT")


def _sessions() -> list[RelaySMTP]:
    import gc
    return [o for o in gc.get_objects() if isinstance(o, RelaySMTP) and o.transport is not None]


def test_free_space_is_read_at_most_once_a_second(tmp_path: Path, monkeypatch) -> None:
    import shutil
    reads: list[str] = []
    real = shutil.disk_usage

    def usage(path):   # type: ignore[no-untyped-def]
        reads.append(str(path))
        return real(path)
    monkeypatch.setattr(shutil, "disk_usage", usage)
    now = [100.0]
    free = spool_free_space(tmp_path / "spool" / "not-yet", clock=lambda: now[0])
    first = free()
    assert isinstance(first, int) and first > 0
    assert reads == [str(tmp_path)]          # the nearest folder that exists
    now[0] += 0.5
    assert free() == first and len(reads) == 1
    now[0] += 0.6
    free()
    assert len(reads) == 2


def test_a_fresh_reading_is_there_for_a_refusal(tmp_path: Path, monkeypatch) -> None:
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    space = {"free": 10}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100, 100 - space["free"], space["free"]))
    free = spool_free_space(tmp_path, clock=lambda: 5.0)
    assert free() == 10
    space["free"] = 90
    assert free() == 10              # the kept reading
    assert free.fresh() == 90        # read now (what MAIL asks before it refuses)
    assert free() == 90


async def test_quit_answers_221_closes_and_reads_nothing_more(relays):
    relay = await relays()
    client = await Client.connect(relay.port)
    await client.cmd(b"EHLO c.test")
    await client.cmd(b"MAIL FROM:<a@x.test>")
    await client.send(b"QUIT\r\nRCPT TO:<b@y.test>\r\nNOOP\r\n")   # pipelined after QUIT
    assert code(await client.reply()) == "221"
    assert await asyncio.wait_for(client.reader.read(), 10) == b""   # then the end, no reply more
    await until(lambda: relay.state.gate.total == 0, what="the connection's slot given back")
    sessions = [s for s in _sessions()]
    assert sessions == []   # no session left with a transport
    await client.close()


async def test_a_finished_session_is_freed_without_the_cycle_collector(relays):
    import gc
    relay = await relays()
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):   # a session that says QUIT, and one that is dropped mid-DATA
            client = await Client.connect(relay.port)
            await client.cmd(b"EHLO c.test")
            await client.cmd(b"QUIT")
            await client.close()
            client = await Client.connect(relay.port)
            await client.cmd(b"EHLO c.test")
            await client.cmd(b"MAIL FROM:<a@x.test>")
            await client.cmd(b"RCPT TO:<b@y.test>")
            await client.cmd(b"DATA")
            await client.send(b"Subject: half\r\n")
            await client.close()
        await until(lambda: relay.state.gate.total == 0, what="every connection's slot given back")
        await until(lambda: not _sessions(), what="no session left with a transport")
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        assert not [o for o in gc.garbage if isinstance(o, RelaySMTP)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
