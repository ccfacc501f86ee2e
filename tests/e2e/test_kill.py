"""The headline durability test: SIGKILL the relay under load, restart it on the same spool.

Several client threads submit a few hundred messages (each with a unique Message-ID) over
SMTP, as real clients do: a message that got no `250` is sent again once the relay is
back. Part-way through, the relay is killed with SIGKILL (twice) and restarted at once on
the same spool and port. In the end every message that got a `250` must have arrived at
the sink at least once (G1, G3). With `--smtp-processes 2` the kill hits the relay's own
process while its intake processes hold messages between their `250` and the relay's
reading of the hand-over record; those are found on disk at the restart. Duplicates are allowed (at-least-once) and are counted
and reported, never more than the messages in flight at the moments of the kills.
"""
from __future__ import annotations

import asyncio
import collections
import random
import smtplib
import threading
import time

import pytest

from tests.e2e.conftest import message
from tests.support.fake_smtp import FakeSmtp

pytestmark = pytest.mark.slow

CLIENTS = 4
PER_CLIENT = 75
KILLS_AT = (0.3, 0.65)        # fractions of all messages acknowledged
RUN_LIMIT = 60.0              # seconds for the submission phase


class Load:
    def __init__(self, relay) -> None:
        self.relay = relay
        self.lock = threading.Lock()
        self.acked: set[str] = set()
        self.unconfirmed: set[str] = set()   # the connection broke before we saw a reply
        self.refused_attempts = 0
        self.deadline = time.monotonic() + RUN_LIMIT

    def client(self, n: int) -> None:
        rng = random.Random(n)
        todo = [(f"<kill-{n}-{i}@load.test>", rng.randrange(200, 20_000)) for i in range(PER_CLIENT)]
        conn = None
        i = 0
        while i < len(todo) and time.monotonic() < self.deadline:
            msgid, size = todo[i]
            data = message("load@home.test", ["sink@example.net"], msgid=msgid, size=size)
            try:
                if conn is None:
                    conn = smtplib.SMTP(*self.relay.address, timeout=15)
                conn.sendmail("load@home.test", ["sink@example.net"], data)
            except (smtplib.SMTPException, OSError):
                with self.lock:
                    self.unconfirmed.add(msgid)
                    self.refused_attempts += 1
                if conn is not None:
                    try:
                        conn.close()
                    except OSError:
                        pass
                conn = None
                time.sleep(0.05)   # a client's pause before it tries again, not synchronisation
                continue
            with self.lock:
                self.acked.add(msgid)
            i += 1
        if conn is not None:
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                pass

    def killer(self) -> list[int]:
        total = CLIENTS * PER_CLIENT
        kills = []
        for fraction in KILLS_AT:
            while len(self.acked) < fraction * total:
                if time.monotonic() > self.deadline:
                    return kills
                time.sleep(0.005)
            kills.append(len(self.acked))
            self.relay.kill()
            self.relay.start()
        return kills


@pytest.mark.parametrize("processes", ["0", "2"])   # SMTP intake in the relay's process, or in two of its own
async def test_sigkill_under_load_loses_no_acknowledged_message(make_relay, tmp_path, record_property, processes):
    async with FakeSmtp("127.0.0.3") as sink:
        relay = make_relay(f"engine sink = smtp://127.0.0.3:{sink.port} tls none timeout 10s\n",
                           min_backoff="0.5s", max_backoff="1s", args=["--smtp-processes", processes])
        await relay.astart()
        load = Load(relay)
        *_, kills = await asyncio.gather(*(asyncio.to_thread(load.client, n) for n in range(CLIENTS)),
                                         asyncio.to_thread(load.killer))
        # wait (bounded) until every acknowledged message arrived
        deadline = time.monotonic() + 30
        while True:
            arrived = collections.Counter(m.header("Message-ID") for m in sink.messages)
            missing = load.acked - set(arrived)
            if not missing or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await relay.astop()

    sent_ids = {f"<kill-{n}-{i}@load.test>" for n in range(CLIENTS) for i in range(PER_CLIENT)}
    duplicates = sum(c - 1 for c in arrived.values() if c > 1)
    report = (f"kills after {kills} acknowledgements; acknowledged {len(load.acked)}/{len(sent_ids)}; "
              f"arrived {len(arrived)} distinct, {duplicates} duplicate(s); "
              f"{load.refused_attempts} client attempt(s) failed while the relay was down")
    print(report)
    record_property("kill_test", report)
    assert len(kills) == len(KILLS_AT), f"the load ended before the kills: {report}"
    assert load.acked == sent_ids, f"clients could not finish in {RUN_LIMIT}s: {report}"
    assert not missing, f"acknowledged but never delivered: {sorted(missing)[:10]} ({report})\n{relay.log}"
    assert set(arrived) <= sent_ids
    assert duplicates <= 200, report                     # bounded by what was in flight at the kills
    assert "Traceback" not in relay.log
    assert not any((tmp_path / "spool" / "corrupt").iterdir()), "a killed write left a torn file live"
    assert relay.log.count("serving on") == 1 + len(KILLS_AT)
    assert "SMTP intake process" not in relay.log      # every intake process died with its relay
