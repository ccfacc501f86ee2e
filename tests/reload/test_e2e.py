"""Hot reload through the whole relay: `routedsl serve` in a subprocess, real sinks, real saves.

Issue 4's end-to-end promises: a save is followed within moments (asserted: 3 s), and a
file rewritten under load never routes a message by a partial or broken version.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import time
import uuid
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from tests.reload.conftest import save_atomic, until
from tests.reload.sinks import Sink
from tests.support.relay import RelayProcess

pytestmark = pytest.mark.slow
DOMAINS = [f"d{n:02d}.test" for n in range(50)]


def routing(trap: Sink, s0: Sink, s1: Sink, chosen: str, broken: bool = False) -> str:
    """Every dNN.test goes only to `chosen`. The trap comes first in the default order:
    any file that lacks a domain's rule (a prefix of this one) routes it to the trap."""
    lines = [f"engine trap = {trap.url} tls none",
             f"engine s0 = {s0.url} tls none",
             f"engine s1 = {s1.url} tls none"]
    lines += [f"if destination is {d} then use only {chosen}" for d in DOMAINS]
    if broken:
        lines[-1] = lines[-1].replace(f"use only {chosen}", "use only s9")
    return "\n".join(lines) + f"\n# end of the rules choosing {chosen}\n"


def message(to: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "client@sender.test"
    msg["To"] = to
    msg["Subject"] = "reload"
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@sender.test>"
    msg.set_content("hello\n")
    return msg


async def send(relay: RelayProcess, to: str) -> str:
    msg = message(to)
    host, port = relay.address
    await aiosmtplib.send(msg, hostname=host, port=port, timeout=10, start_tls=False)
    return msg["Message-ID"]


@contextlib.asynccontextmanager
async def relay_with(tmp_path: Path, text: str):
    rules = tmp_path / "routes.rules"
    rules.write_text(text)
    relay = RelayProcess(rules, tmp_path / "spool")
    await relay.astart()
    try:
        yield relay, rules
    finally:
        await relay.astop()
        assert "Traceback" not in relay.log, relay.log


async def test_a_save_routes_the_next_message_by_the_new_rule_within_3_s(tmp_path):
    async with Sink("trap") as trap, Sink("s0") as s0, Sink("s1") as s1:
        async with relay_with(tmp_path, routing(trap, s0, s1, "s0")) as (relay, rules):
            first = await send(relay, "a@d07.test")
            await until(lambda: first in s0.ids(), 10, "the first message at s0")
            saved = time.monotonic()
            save_atomic(rules, routing(trap, s0, s1, "s1"))
            # Probe until a message is routed by the new rule; time save -> arrival.
            while not s1.arrivals:
                assert time.monotonic() - saved < 3, "not routed by the new rule within 3 s"
                await send(relay, "a@d07.test")
                await asyncio.sleep(0.02)
            latency = s1.arrivals[0].at - saved
            assert latency < 3
            assert not trap.arrivals
            relay.wait_for_log(r"rules version [0-9a-f]{12} active: 3 engines, 50 rules")


async def test_refused_save_keeps_routing_and_is_logged_like_check(tmp_path):
    async with Sink("trap") as trap, Sink("s0") as s0, Sink("s1") as s1:
        async with relay_with(tmp_path, routing(trap, s0, s1, "s0")) as (relay, rules):
            active = re.search(r"version=([0-9a-f]{12})", relay.log).group(1)
            save_atomic(rules, routing(trap, s0, s1, "s1", broken=True))
            await asyncio.to_thread(
                relay.wait_for_log,
                rf"{re.escape(str(rules))}:53:\d+: error\[unknown-engine\]"
                rf"(.|\n)*reload refused; version {active} stays active")
            sent = await send(relay, "a@d49.test")
            await until(lambda: sent in s0.ids(), 10, "delivery by the kept rules")
            assert not trap.arrivals and not s1.arrivals


def _write_in_place(path: Path, text: str, pause: float) -> None:
    half = len(text) // 2
    if "\n" in text[half - 1:half + 1]:
        half += 5   # cut mid-line, so the first half is never a valid file on its own
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text[:half])
        handle.flush()
        time.sleep(pause)
        handle.write(text[half:])


def _delete_then_create(path: Path, text: str, pause: float) -> None:
    path.unlink()
    time.sleep(pause)
    path.write_text(text)


def _truncate_then_write(path: Path, text: str, pause: float) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.flush()
        time.sleep(pause)
        handle.write(text)


async def test_rewriting_the_file_100_times_under_load_never_routes_by_a_broken_file(tmp_path):
    rng = random.Random(4)
    async with Sink("trap") as trap, Sink("s0") as s0, Sink("s1") as s1:
        texts = [routing(trap, s0, s1, "s0"), routing(trap, s0, s1, "s1"),
                 routing(trap, s0, s1, "s0", broken=True)]
        async with relay_with(tmp_path, texts[0]) as (relay, rules):
            accepted: list[str] = []
            writing = True

            async def client() -> None:
                while writing:
                    accepted.append(await send(relay, f"u@{rng.choice(DOMAINS)}"))

            def writer() -> None:
                modes = itertools.cycle([
                    lambda p, t: save_atomic(p, t),
                    lambda p, t: _write_in_place(p, t, rng.uniform(0.005, 0.03)),
                    lambda p, t: _delete_then_create(p, t, 0.05),
                    lambda p, t: _truncate_then_write(p, t, 0.05),
                ])
                for number in range(100):
                    next(modes)(rules, texts[number % 3])
                    time.sleep(rng.uniform(0.02, 0.08))
                save_atomic(rules, texts[1])   # end on a known valid version (s1)

            clients = [asyncio.create_task(client()) for _ in range(3)]
            try:
                await asyncio.wait_for(asyncio.to_thread(writer), 40)
            finally:
                writing = False
                await asyncio.gather(*clients)
            assert len(accepted) > 50
            await until(lambda: set(accepted) <= s0.ids() | s1.ids(), 30,
                        "every accepted message delivered")
            assert trap.arrivals == []
            # The last (valid) save wins: within moments, probes go to s1.
            saved_last = time.monotonic()
            while not any(a.recipients == ("u@d49.test",) and a.at > saved_last
                          for a in s1.arrivals):
                assert time.monotonic() - saved_last < 3, "the last version is not active"
                await send(relay, "u@d49.test")
                await asyncio.sleep(0.02)
            assert "reload refused; version" in relay.log
            # The relay followed the file while it was busy, not only at the end.
            assert len(re.findall(r"active: 3 engines, 50 rules", relay.log)) >= 3


async def test_a_fixed_rule_frees_waiting_mail_at_its_next_attempt_or_at_queue_retry(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:   # a port where nothing listens: the engine is down
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    async with Sink("trap") as trap, Sink("s0") as s0, Sink("s1") as s1:
        stuck = routing(trap, s0, s1, "s0").replace(
            f"engine s0 = {s0.url}", f"engine s0 = smtp://127.0.0.1:{dead_port}")
        rules = tmp_path / "routes.rules"
        rules.write_text(stuck)
        relay = RelayProcess(rules, tmp_path / "spool", min_backoff="1h", max_backoff="2h")
        await relay.astart()
        try:
            waiting = await send(relay, "a@d03.test")
            await asyncio.to_thread(relay.wait_for_log, r": deferred .* until ")
            save_atomic(rules, routing(trap, s0, s1, "s1"))
            await asyncio.to_thread(relay.wait_for_log, r"active: 3 engines, 50 rules")
            assert s1.arrivals == []   # its next attempt is an hour away
            done = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "routedsl", "queue", "retry", "--all",
                                 "--spool", str(tmp_path / "spool")],
                capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            await until(lambda: waiting in s1.ids(), 10, "the waiting message routed by the fix")
            assert trap.arrivals == [] and s0.arrivals == []
        finally:
            await relay.astop()
        assert "Traceback" not in relay.log, relay.log


async def test_status_shows_the_active_version_and_sighup_reloads(tmp_path):
    import json
    import signal
    import subprocess
    import sys

    def status() -> dict:
        done = subprocess.run([sys.executable, "-m", "routedsl", "status", "--spool",
                               str(tmp_path / "spool"), "--format", "json"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    async with Sink("trap") as trap, Sink("s0") as s0, Sink("s1") as s1:
        async with relay_with(tmp_path, routing(trap, s0, s1, "s0")) as (relay, rules):
            first = await asyncio.to_thread(status)
            assert first["running"] is True
            assert first["engines"] == ["trap", "s0", "s1"] and first["rules"] == 50
            assert first["file"] == str(rules)
            # Saved without a change event reaching the relay (the watch sees it anyway,
            # but SIGHUP is the operator's way to insist): the new version goes live.
            save_atomic(rules, routing(trap, s0, s1, "s1"))
            relay.signal(signal.SIGHUP)
            await asyncio.to_thread(relay.wait_for_log, r"\(SIGHUP, \d+ ms\)")
            await until(lambda: status()["version"] != first["version"], 5,
                        "the new version in `routedsl status`")
            assert status()["last_refused"] is None
        assert (await asyncio.to_thread(status))["running"] is False


async def test_new_credentials_apply_to_new_connections_after_sighup(tmp_path):
    import signal

    from tests.support import certs
    from tests.support.fake_smtp import FakeSmtp

    password = tmp_path / "isp.pw"
    password.write_text("wrong\n")
    async with FakeSmtp("127.0.0.1", tls="starttls", auth=("me", "pw-R1ght-7e3")) as isp:
        rules = tmp_path / "routes.rules"
        rules.write_text(f'engine isp = smtp://127.0.0.1:{isp.port} user "me" '
                         f'password file:{password}\n')
        relay = RelayProcess(rules, tmp_path / "spool", ca_file=certs.ca_file(),
                             min_backoff="1s", max_backoff="1s")
        await relay.astart()
        try:
            waiting = await send(relay, "friend@x.test")
            await asyncio.to_thread(relay.wait_for_log, r": deferred .* until ")
            assert isp.messages == []
            password.write_text("pw-R1ght-7e3\n")   # the rules file itself is unchanged
            relay.signal(signal.SIGHUP)
            await asyncio.to_thread(relay.wait_for_log, r"active: 1 engines, 0 rules \(SIGHUP")
            [arrived] = await isp.wait_for(1, timeout=15)
            assert arrived.user == "me" and arrived.tls
            assert arrived.header("Message-ID") == waiting
        finally:
            await relay.astop()
        assert "Traceback" not in relay.log, relay.log
        assert "pw-R1ght-7e3" not in relay.log   # no secret in the log
