"""What the per-connection set-up of a session is cut down to still behaves the same: HELP
still reads each command's syntax through the counting wrapper, the login mechanisms found
once per class are bound to each session, and the spool's free space is read at most once
per second (the disk reserve at MAIL uses that reading)."""
from __future__ import annotations

from pathlib import Path

from server.smtp import RelaySMTP, spool_free_space
from tests.security.harness import Client, code


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
