"""The Reloader over real files in a temporary folder: every way a file gets saved."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import pytest

from server.reload import Reloader
from server.snapshot import Snapshot, build_snapshot
from server.status import read_active
from tests.reload.conftest import rules, save_atomic, until

ENGINES = ("a = smtp://127.0.0.1:2601 tls none", "b = smtp://127.0.0.1:2602 tls none")
VIA_A = rules(*ENGINES, rule_lines=("if destination is x.test then try a first",))
VIA_B = rules(*ENGINES, rule_lines=("if destination is x.test then try b first",))
BROKEN = rules(*ENGINES, rule_lines=("if destination is x.test then try c first",))


def first_engine(snapshot: Snapshot) -> str:
    return snapshot.table.plan("someone@x.test").engines[0]


class Relay:
    """What the app does with a Reloader: hold the active snapshot, record every swap."""

    def __init__(self, reloader_args: dict) -> None:
        self.swaps: list[Snapshot] = []
        self.reloader = Reloader(on_swap=self._swap, **reloader_args)
        self.active = self.reloader.current

    def _swap(self, snapshot: Snapshot) -> None:
        self.active = snapshot
        self.swaps.append(snapshot)


@contextlib.asynccontextmanager
async def watching(path: Path, ctx, *, spool: Path | None = None, **options):
    initial = build_snapshot(path.read_text(), str(path), ctx)
    relay = Relay(dict(path=path, ctx=ctx, initial=initial, spool=spool, **options))
    task = asyncio.create_task(relay.reloader.run())
    try:
        await asyncio.wait_for(relay.reloader.ready.wait(), 5)
        yield relay
    finally:
        relay.reloader.stop()
        await asyncio.wait_for(task, 10)


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "conf" / "routes.rules"
    path.parent.mkdir()
    path.write_text(VIA_A)
    return path


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "routedsl.reload" and "reload refused" in r.getMessage()]


async def test_save_by_rename_goes_live_and_logs_one_line(rules_file, ctx, caplog):
    caplog.set_level(logging.INFO, logger="routedsl.reload")
    async with watching(rules_file, ctx) as relay:
        assert first_engine(relay.active) == "a"
        save_atomic(rules_file, VIA_B)
        await until(lambda: first_engine(relay.active) == "b", what="the new rules")
        assert len(relay.swaps) == 1
        version = relay.active.version
    lines = [r.getMessage() for r in caplog.records if "active:" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(f"rules version {version} active: 2 engines, 1 rules (")
    assert lines[0].endswith(" ms)")


async def test_invalid_file_is_refused_and_the_active_version_stays(rules_file, ctx, caplog):
    caplog.set_level(logging.INFO, logger="routedsl.reload")
    async with watching(rules_file, ctx) as relay:
        kept = relay.active.version
        save_atomic(rules_file, BROKEN)
        await until(lambda: refusals(caplog), what="the refusal")
        message = refusals(caplog)[0]
        assert f"{rules_file}:3:" in message
        assert "error[unknown-engine]" in message
        assert message.endswith(f"reload refused; version {kept} stays active")
        assert relay.swaps == [] and relay.active.version == kept
        # The relay keeps following the file: the next good save goes live.
        save_atomic(rules_file, VIA_B)
        await until(lambda: first_engine(relay.active) == "b", what="the fixed rules")
        assert len(refusals(caplog)) == 1


async def test_half_written_file_never_goes_live(rules_file, ctx, caplog):
    # The first half is a valid file on its own (engine `a` only): read too early it
    # would route everything through `a`. Only the whole file may go live.
    full = rules(*reversed(ENGINES), rule_lines=("if destination is x.test then try a first",))
    half = full.split("\n", 1)[0] + "\n"
    assert build_snapshot(half, "half", ctx).table.engines  # valid on its own
    # A settle time well above the writer's pause, so a busy test machine cannot
    # stretch the pause past it.
    async with watching(rules_file, ctx, settle=0.3) as relay:
        with open(rules_file, "w", encoding="utf-8") as handle:
            handle.write(half)
            handle.flush()
            await asyncio.sleep(0.01)   # the writer pauses between the halves
            handle.write(full[len(half):])
        await until(lambda: len(relay.active.engines) == 2 and list(relay.active.engines)[0] == "b",
                    what="the whole file")
        assert [list(s.engines) for s in relay.swaps] == [["b", "a"]]


async def test_half_written_invalid_prefix_is_refused_then_the_whole_file_goes_live(
        rules_file, ctx, caplog):
    caplog.set_level(logging.INFO, logger="routedsl.reload")
    async with watching(rules_file, ctx) as relay:
        cut = VIA_B.index("then") + 2
        with open(rules_file, "w", encoding="utf-8") as handle:
            handle.write(VIA_B[:cut])
            handle.flush()
            # A long pause: the watcher reads the half file, refuses it, keeps `a`.
            await until(lambda: refusals(caplog), what="the half file refused")
            assert relay.swaps == []
            handle.write(VIA_B[cut:])
        await until(lambda: first_engine(relay.active) == "b", what="the whole file")


async def test_empty_file_is_refused(rules_file, ctx, caplog):
    caplog.set_level(logging.INFO, logger="routedsl.reload")
    async with watching(rules_file, ctx) as relay:
        kept = relay.active.version
        rules_file.write_text("")
        await until(lambda: refusals(caplog), what="the refusal")
        assert "no-engines" in refusals(caplog)[0]
        assert relay.active.version == kept and relay.swaps == []


async def test_delete_then_recreate(rules_file, ctx, caplog):
    caplog.set_level(logging.INFO, logger="routedsl.reload")
    async with watching(rules_file, ctx) as relay:
        kept = relay.active.version
        rules_file.unlink()
        await until(lambda: any("is missing" in r.getMessage() for r in caplog.records),
                    what="the missing-file warning")
        assert relay.active.version == kept
        rules_file.write_text(VIA_B)
        await until(lambda: first_engine(relay.active) == "b", what="the recreated file")
        assert len(relay.swaps) == 1


async def test_symlink_switched_to_another_target(tmp_path, ctx):
    for name, text in (("v1", VIA_A), ("v2", VIA_B)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "routes.rules").write_text(text)
    link = tmp_path / "routes.rules"
    link.symlink_to(tmp_path / "v1" / "routes.rules")
    async with watching(link, ctx) as relay:
        temp_link = tmp_path / ".routes.rules.new"
        temp_link.symlink_to(tmp_path / "v2" / "routes.rules")
        os.replace(temp_link, link)   # atomic switch, as deploy tools do
        await until(lambda: first_engine(relay.active) == "b", what="the new target")
        # Now the watch follows the new target's folder: an edit there goes live too.
        save_atomic(tmp_path / "v2" / "routes.rules", VIA_A)
        await until(lambda: first_engine(relay.active) == "a", what="the edited target")
        # And an edit of the old target is not the active file any more.
        save_atomic(tmp_path / "v1" / "routes.rules", BROKEN)
        (tmp_path / "v1" / "routes.rules").write_text(VIA_B)
        await relay.reloader.reload_now("probe")
        assert first_engine(relay.active) == "a"


async def test_port_change_builds_a_new_engine_and_retires_the_old(rules_file, ctx):
    async with watching(rules_file, ctx) as relay:
        old = relay.active
        save_atomic(rules_file, VIA_A.replace("2602", "2622"))
        await until(lambda: relay.swaps, what="the new port")
        new = relay.active
        assert new.engines["a"] is old.engines["a"]
        assert new.engines["b"] is not old.engines["b"]
        assert new.engines["b"].spec.port == 2622


async def test_sighup_rereads_secrets_and_replaces_only_that_engine(rules_file, ctx, monkeypatch):
    text = rules('a = smtp://127.0.0.1:2601 user "me" password env:RELOAD_TEST_PW', ENGINES[1])
    monkeypatch.setenv("RELOAD_TEST_PW", "old")
    rules_file.write_text(text)
    async with watching(rules_file, ctx) as relay:
        old = relay.active
        same = await relay.reloader.reload_now("SIGHUP", force=True)
        assert same.accepted
        assert relay.active.engines["a"] is old.engines["a"]
        monkeypatch.setenv("RELOAD_TEST_PW", "new")
        result = await relay.reloader.reload_now("SIGHUP", force=True)
        assert result.accepted and result.swapped
        assert relay.active.engines["a"] is not old.engines["a"]
        assert relay.active.engines["b"] is old.engines["b"]


async def test_sighup_with_a_missing_secret_keeps_the_active_version(rules_file, ctx, monkeypatch,
                                                                     caplog):
    caplog.set_level(logging.INFO, logger="routedsl.reload")
    text = rules('a = smtp://127.0.0.1:2601 user "me" password env:RELOAD_TEST_PW', ENGINES[1])
    monkeypatch.setenv("RELOAD_TEST_PW", "old")
    rules_file.write_text(text)
    async with watching(rules_file, ctx) as relay:
        kept = relay.active
        monkeypatch.delenv("RELOAD_TEST_PW")
        result = await relay.reloader.reload_now("SIGHUP", force=True)
        assert not result.accepted and result.version == kept.version
        assert relay.active is kept
        assert f"{rules_file}:1:" in result.detail and "missing-secret" in result.detail


async def test_request_runs_a_reload_from_sync_code(rules_file, ctx):
    async with watching(rules_file, ctx) as relay:
        rules_file.write_text(VIA_B)
        relay.reloader.request("SIGHUP")
        await until(lambda: first_engine(relay.active) == "b", what="the SIGHUP reload")


async def test_active_version_is_recorded_in_the_spool(rules_file, ctx, tmp_path, caplog):
    spool = tmp_path / "spool"
    spool.mkdir()
    async with watching(rules_file, ctx, spool=spool) as relay:
        first = read_active(spool)
        assert first["version"] == relay.active.version
        assert first["engines"] == ["a", "b"] and first["rules"] == 1
        assert first["file"] == str(rules_file)
        save_atomic(rules_file, BROKEN)
        await until(lambda: read_active(spool).get("last_refused"), what="the refusal noted")
        assert read_active(spool)["version"] == first["version"]
        save_atomic(rules_file, VIA_B)
        await until(lambda: read_active(spool)["version"] == relay.active.version != first["version"],
                    what="the new version recorded")
        assert read_active(spool)["last_refused"] is None


async def test_a_file_that_is_not_utf8_is_refused_at_the_bad_byte(rules_file, ctx, caplog):
    caplog.set_level(logging.INFO, logger="routedsl.reload")
    async with watching(rules_file, ctx) as relay:
        kept = relay.active.version
        temp = rules_file.with_name("incoming")
        temp.write_bytes(VIA_B.encode().replace(b"x.test", b"x\xe9.test"))
        os.replace(temp, rules_file)   # whole, so the only problem is the encoding
        await until(lambda: refusals(caplog), what="the refusal")
        column = VIA_B.splitlines()[2].index("x.test") + 2
        assert f"{rules_file}:3:{column}: error[bad-encoding]" in refusals(caplog)[0]
        assert relay.active.version == kept


async def test_config_map_style_folder_symlink_switch(tmp_path, ctx):
    # routes.rules -> ..data/routes.rules, ..data -> ..v1; a deploy switches ..data to ..v2.
    for name, text in (("..v1", VIA_A), ("..v2", VIA_B)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "routes.rules").write_text(text)
    (tmp_path / "..data").symlink_to("..v1")
    link = tmp_path / "routes.rules"
    link.symlink_to("..data/routes.rules")
    async with watching(link, ctx) as relay:
        (tmp_path / "..data_tmp").symlink_to("..v2")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        await until(lambda: first_engine(relay.active) == "b", what="the switched folder")


async def test_rules_folder_removed_and_recreated(tmp_path, ctx, caplog):
    caplog.set_level(logging.INFO, logger="routedsl.reload")
    folder = tmp_path / "conf"
    folder.mkdir()
    path = folder / "routes.rules"
    path.write_text(VIA_A)
    async with watching(path, ctx) as relay:
        path.unlink()
        folder.rmdir()
        await until(lambda: any("is missing" in r.getMessage() for r in caplog.records),
                    what="the missing-file warning")
        folder.mkdir()
        path.write_text(VIA_B)
        await until(lambda: first_engine(relay.active) == "b", what="the recreated folder")
        save_atomic(path, VIA_A)   # and the new folder is watched
        await until(lambda: first_engine(relay.active) == "a", what="an edit in the new folder")


async def test_a_relay_started_by_load_snapshot_does_not_reload_an_unchanged_crlf_file(
        tmp_path, ctx, caplog):
    from server.reload import load_snapshot

    caplog.set_level(logging.INFO, logger="routedsl.reload")
    path = tmp_path / "routes.rules"
    path.write_bytes(VIA_A.replace("\n", "\r\n").encode())
    initial = await load_snapshot(path, ctx)
    swaps: list[Snapshot] = []
    reloader = Reloader(path, ctx, swaps.append, initial)
    task = asyncio.create_task(reloader.run())
    try:
        await asyncio.wait_for(reloader.ready.wait(), 5)
        result = await reloader.reload_now("probe")   # what the first poll does
        assert result.accepted and not result.swapped and swaps == []
    finally:
        reloader.stop()
        await asyncio.wait_for(task, 10)


async def test_the_active_content_is_not_compiled_again(tmp_path, ctx, monkeypatch):
    """The first poll after start-up, and a save that puts back the active text, find
    the active version without compiling the file again."""
    import server.reload as reload
    from server.reload import load_snapshot

    path = tmp_path / "routes.rules"
    path.write_text(VIA_A)
    initial = await load_snapshot(path, ctx)
    compiled: list[str] = []
    real_prepare = reload.prepare

    def prepare(text, filename):
        compiled.append(text)
        return real_prepare(text, filename)
    monkeypatch.setattr(reload, "prepare", prepare)
    reloader = Reloader(path, ctx, lambda snap: None, initial)
    task = asyncio.create_task(reloader.run())
    try:
        await asyncio.wait_for(reloader.ready.wait(), 5)
        first = await reloader.reload_now("probe")          # what the first poll does
        save_atomic(path, VIA_A)                            # a save that changes nothing
        again = await reloader.reload_now("file changed")
        forced = await reloader.reload_now("SIGHUP", force=True)   # SIGHUP still rebuilds
        assert [r.detail for r in (first, again)] == ["unchanged", "unchanged"]
        assert forced.accepted and compiled == [VIA_A]
    finally:
        reloader.stop()
        await asyncio.wait_for(task, 10)


async def test_a_replaced_engine_finishes_its_delivery_in_flight_then_closes(tmp_path, ctx):
    from server.engines.base import Envelope
    from tests.reload.sinks import Sink

    async with Sink("old") as old_sink, Sink("new") as new_sink:
        path = tmp_path / "routes.rules"
        path.write_text(rules(f"a = {old_sink.url} tls none"))
        async with watching(path, ctx) as relay:
            engine = relay.active.engines["a"]
            envelope = Envelope("Q1", "me@sender.test", b"Subject: t\r\n\r\nhello\r\n")
            old_sink.hold = asyncio.Event()
            delivery = asyncio.create_task(engine.deliver(envelope, ["you@x.test"]))
            await until(lambda: old_sink.held == 1, what="the delivery in flight")
            save_atomic(path, rules(f"a = {new_sink.url} tls none"))
            await until(lambda: relay.swaps, what="the new engine")
            assert relay.active.engines["a"] is not engine
            assert not delivery.done()            # retiring waits for it
            old_sink.hold.set()
            outcomes = await asyncio.wait_for(delivery, 10)
            assert outcomes["you@x.test"].kind.name == "DELIVERED"
            # Then the retired engine closes its pooled connection.
            await until(lambda: old_sink.connections == 0, what="the old connection closed")
            new = await relay.active.engines["a"].deliver(envelope, ["you@x.test"])
            assert new["you@x.test"].kind.name == "DELIVERED"
            assert len(new_sink.arrivals) == 1 and len(old_sink.arrivals) == 1
            await relay.active.engines["a"].aclose()


async def test_retired_engines_wait_until_attempts_on_the_old_rules_are_done(tmp_path, ctx):
    # The relay passes Scheduler.drained as before_retire: an attempt that started with the
    # old rules may still need their engines further down its plan.
    from server.engines.base import Envelope
    from tests.reload.sinks import Sink

    async with Sink("old") as old_sink, Sink("new") as new_sink:
        path = tmp_path / "routes.rules"
        path.write_text(rules(f"a = {old_sink.url} tls none"))
        gate = asyncio.Event()
        waited_for: list[Snapshot] = []

        async def attempts_done(snapshot: Snapshot) -> None:
            waited_for.append(snapshot)
            await gate.wait()

        async with watching(path, ctx, before_retire=attempts_done) as relay:
            old = relay.active
            envelope = Envelope("Q1", "me@sender.test", b"Subject: t\r\n\r\nhello\r\n")
            save_atomic(path, rules(f"a = {new_sink.url} tls none"))
            await until(lambda: waited_for, what="the retirement waiting for attempts")
            assert waited_for == [old] and relay.active is not old
            # Still open for the attempt that started with the old rules.
            late = await old.engines["a"].deliver(envelope, ["you@x.test"])
            assert late["you@x.test"].kind.name == "DELIVERED"
            gate.set()
            await until(lambda: old_sink.connections == 0, what="the old engine closed")
            await relay.active.engines["a"].aclose()
