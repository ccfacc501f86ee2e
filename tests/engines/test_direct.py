"""The direct engine against fake MX hosts on 127.0.0.2/.3 and a real UDP DNS server."""
from __future__ import annotations

import asyncio
import ssl

import pytest

from server.engines.base import build_engine
from server.outcome import Kind
from tests.engines.helpers import context, direct_spec, envelope
from tests.support.dns_server import DnsServer
from tests.support.fake_smtp import fake_mx_hosts

ZONES = {
    "ok.test": {"MX": [(10, "mx1.ok.test"), (20, "mx2.ok.test")]},
    "mx1.ok.test": {"A": ["127.0.0.2"]},
    "mx2.ok.test": {"A": ["127.0.0.3"]},
    "other.test": {"MX": [(10, "mx.other.test")]},
    "mx.other.test": {"A": ["127.0.0.3"]},
    "plain.test": {"A": ["127.0.0.2"]},
    "nomail.test": {"MX": [(0, ".")]},
}


@pytest.fixture
async def dns_server():
    async with DnsServer(ZONES) as server:
        yield server


async def _direct(dns_server, port, **options):
    ctx = context(dns_server.nameserver, final_timeout=options.pop("final_timeout", 10.0))
    return build_engine(direct_spec(port=port, **options), None, ctx)


async def test_delivers_to_the_preferred_mx(dns_server):
    async with fake_mx_hosts(["127.0.0.2", "127.0.0.3"]) as (mx1, mx2):
        engine = await _direct(dns_server, mx1.port)
        got = await engine.deliver(envelope(), ["bob@ok.test"])
        await engine.aclose()
        assert got["bob@ok.test"].delivered
        assert got["bob@ok.test"].host == "mx1.ok.test"
        assert [m.recipients for m in mx1.messages] == [["bob@ok.test"]]
        assert mx2.connections == 0


async def test_implicit_mx(dns_server):
    async with fake_mx_hosts(["127.0.0.2"]) as (mx1,):
        engine = await _direct(dns_server, mx1.port)
        got = await engine.deliver(envelope(to="bob@plain.test"), ["bob@plain.test"])
        await engine.aclose()
        assert got["bob@plain.test"].delivered and len(mx1.messages) == 1


async def test_fails_over_when_the_first_mx_refuses_connections(dns_server):
    async with fake_mx_hosts(["127.0.0.3"]) as (mx2,):  # nothing listens on 127.0.0.2
        engine = await _direct(dns_server, mx2.port)
        got = await engine.deliver(envelope(), ["bob@ok.test"])
        await engine.aclose()
        assert got["bob@ok.test"].delivered and got["bob@ok.test"].host == "mx2.ok.test"
        assert len(mx2.messages) == 1


@pytest.mark.parametrize("command,action", [
    ("GREETING", "421"), ("GREETING", "drop"), ("EHLO", "421"), ("MAIL", "451"),
    ("RCPT", "451"), ("RCPT", "drop"), ("DATA", "451"), ("DATA", "drop"),
])
async def test_fails_over_to_the_next_mx_on_engine_faults(dns_server, command, action):
    async with fake_mx_hosts(["127.0.0.2", "127.0.0.3"]) as (mx1, mx2):
        mx1.fail(command, action)
        engine = await _direct(dns_server, mx1.port)
        got = await engine.deliver(envelope(), ["bob@ok.test"])
        await engine.aclose()
        assert got["bob@ok.test"].delivered, got["bob@ok.test"]
        assert len(mx1.messages) == 0 and len(mx2.messages) == 1


async def test_a_stalled_mx_times_out_and_the_next_one_is_used(dns_server):
    async with fake_mx_hosts(["127.0.0.2", "127.0.0.3"]) as (mx1, mx2):
        mx1.fail("MAIL", "stall")
        engine = await _direct(dns_server, mx1.port, timeout=0.5)
        got = await engine.deliver(envelope(), ["bob@ok.test"])
        await engine.aclose()
        assert got["bob@ok.test"].delivered and len(mx2.messages) == 1


async def test_destination_verdict_stops_the_walk(dns_server):
    async with fake_mx_hosts(["127.0.0.2", "127.0.0.3"]) as (mx1, mx2):
        mx1.fail("RCPT", "550 5.1.1 <bob@ok.test>: Recipient address rejected")
        engine = await _direct(dns_server, mx1.port)
        got = await engine.deliver(envelope(), ["bob@ok.test"])
        await engine.aclose()
        o = got["bob@ok.test"]
        assert (o.kind, o.final, o.code, o.enhanced) == (Kind.PERMANENT, True, 550, "5.1.1")
        assert mx2.connections == 0
        assert "DATA" not in mx1.commands


async def test_every_mx_temporary_is_temporary(dns_server):
    async with fake_mx_hosts(["127.0.0.2", "127.0.0.3"]) as (mx1, mx2):
        mx1.fail("RCPT", "451")
        mx2.fail("GREETING", "421")
        engine = await _direct(dns_server, mx1.port)
        got = await engine.deliver(envelope(), ["bob@ok.test"])
        await engine.aclose()
        assert got["bob@ok.test"].temporary and not got["bob@ok.test"].final


async def test_a_temporary_failure_earns_a_retry_over_a_later_permanent_refusal(dns_server):
    async with fake_mx_hosts(["127.0.0.2", "127.0.0.3"]) as (mx1, mx2):
        mx1.fail("RCPT", "451")
        mx2.fail("RCPT", "554 5.7.1 Relay access denied")
        engine = await _direct(dns_server, mx1.port)
        got = await engine.deliver(envelope(), ["bob@ok.test"])
        await engine.aclose()
        assert got["bob@ok.test"].temporary


async def test_null_mx_makes_no_connection(dns_server):
    async with fake_mx_hosts(["127.0.0.2", "127.0.0.3"]) as (mx1, mx2):
        engine = await _direct(dns_server, mx1.port)
        got = await engine.deliver(envelope(to="x@nomail.test"), ["x@nomail.test"])
        await engine.aclose()
        o = got["x@nomail.test"]
        assert (o.final, o.code, o.enhanced, o.engine) == (True, 556, "5.1.10", "direct")
        assert mx1.connections == mx2.connections == 0


async def test_dns_failures(dns_server):
    dns_server.fail("ok.test", "servfail")
    engine = await _direct(dns_server, 25)
    got = await engine.deliver(envelope(), ["bob@ok.test", "x@nowhere.test"])
    await engine.aclose()
    assert got["bob@ok.test"].temporary and got["bob@ok.test"].enhanced == "4.4.3"
    assert got["x@nowhere.test"].final and got["x@nowhere.test"].enhanced == "5.1.2"


async def test_one_transaction_per_domain(dns_server):
    async with fake_mx_hosts(["127.0.0.2", "127.0.0.3"]) as (mx1, mx2):
        engine = await _direct(dns_server, mx1.port)
        rcpts = ["a@ok.test", "c@other.test", "b@OK.test"]
        got = await engine.deliver(envelope(), rcpts)
        await engine.aclose()
        assert all(o.delivered for o in got.values())
        assert [sorted(m.recipients) for m in mx1.messages] == [["a@ok.test", "b@OK.test"]]
        assert [m.recipients for m in mx2.messages] == [["c@other.test"]]


async def test_partial_acceptance_on_one_host(dns_server):
    async with fake_mx_hosts(["127.0.0.2"]) as (mx1,):
        mx1.fail_local("gone", "550 5.1.1 no such user")
        engine = await _direct(dns_server, mx1.port)
        got = await engine.deliver(envelope(to="bob@plain.test"), ["bob@plain.test", "gone@plain.test"])
        await engine.aclose()
        assert got["bob@plain.test"].delivered
        assert got["gone@plain.test"].final
        assert [m.recipients for m in mx1.messages] == [["bob@plain.test"]]


async def test_opportunistic_tls_is_used_unverified(dns_server):
    from tests.support.certs import untrusted_server_context
    async with fake_mx_hosts(["127.0.0.2"], tls="starttls",
                             ssl_context=untrusted_server_context()) as (mx1,):
        engine = await _direct(dns_server, mx1.port)
        got = await engine.deliver(envelope(to="bob@plain.test"), ["bob@plain.test"])
        await engine.aclose()
        assert got["bob@plain.test"].delivered
        assert mx1.messages[0].tls and "STARTTLS" in mx1.commands


async def test_broken_tls_is_retried_in_plaintext(dns_server):
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: every handshake fails
    async with fake_mx_hosts(["127.0.0.2"], tls="starttls", ssl_context=broken) as (mx1,):
        engine = await _direct(dns_server, mx1.port)
        got = await engine.deliver(envelope(to="bob@plain.test"), ["bob@plain.test"])
        await engine.aclose()
        assert got["bob@plain.test"].delivered
        assert mx1.connections == 2 and not mx1.messages[0].tls


async def test_connection_reuse_per_address(dns_server):
    async with fake_mx_hosts(["127.0.0.2"]) as (mx1,):
        engine = await _direct(dns_server, mx1.port)
        for i in range(3):
            got = await engine.deliver(envelope(to="bob@plain.test", queue_id=f"Q{i}"),
                                       ["bob@plain.test"])
            assert got["bob@plain.test"].delivered
        await engine.aclose()
        assert mx1.connections == 1 and len(mx1.messages) == 3
        assert "RSET" not in mx1.commands and mx1.commands[-1] == "QUIT"  # clean after each DATA


async def test_size_too_small_on_one_mx_skips_it(dns_server):
    async with fake_mx_hosts(["127.0.0.2"], size=1000) as (mx1,), \
            fake_mx_hosts(["127.0.0.3"], size=None) as (mx2,):
        # the two hosts must share a port: rebind mx2 on mx1's port when they differ
        if mx2.port != mx1.port:
            await mx2.stop()
            mx2.port = mx1.port
            await mx2.start()
        engine = await _direct(dns_server, mx1.port)
        got = await engine.deliver(envelope(size=5000), ["bob@ok.test"])
        await engine.aclose()
        assert got["bob@ok.test"].delivered and len(mx2.messages) == 1
        assert "MAIL" not in mx1.commands


async def test_null_sender(dns_server):
    async with fake_mx_hosts(["127.0.0.2"]) as (mx1,):
        engine = await _direct(dns_server, mx1.port)
        got = await engine.deliver(envelope(sender="", to="bob@plain.test"), ["bob@plain.test"])
        await engine.aclose()
        assert got["bob@plain.test"].delivered
        assert mx1.messages[0].sender == ""


async def test_recipient_without_domain_is_refused_locally(dns_server):
    engine = await _direct(dns_server, 25)
    got = await engine.deliver(envelope(), ["nodomain"])
    await engine.aclose()
    assert got["nodomain"].final and got["nodomain"].enhanced == "5.1.3"


async def test_equal_preference_spreads_deliveries(dns_server):
    dns_server.add("equal.test", "MX", [(10, "mx1.ok.test"), (10, "mx2.ok.test")])
    async with fake_mx_hosts(["127.0.0.2", "127.0.0.3"]) as (mx1, mx2):
        engine = await _direct(dns_server, mx1.port)
        for i in range(30):
            got = await engine.deliver(envelope(to="x@equal.test", queue_id=f"Q{i}"), ["x@equal.test"])
            assert got["x@equal.test"].delivered
        await engine.aclose()
        assert len(mx1.messages) >= 5 and len(mx2.messages) >= 5
        assert len(mx1.messages) + len(mx2.messages) == 30


async def test_a_full_pool_makes_room_by_closing_an_idle_connection(dns_server):
    async with fake_mx_hosts(["127.0.0.2", "127.0.0.3"]) as (mx1, mx2):
        engine = await _direct(dns_server, mx1.port, connections=1)
        first = await engine.deliver(envelope(to="a@plain.test"), ["a@plain.test"])
        assert mx1.active == 1  # kept idle for reuse
        second = await asyncio.wait_for(
            engine.deliver(envelope(to="c@other.test"), ["c@other.test"]), 10)
        assert first["a@plain.test"].delivered and second["c@other.test"].delivered
        assert engine.pool.open_connections == 1 and engine.pool.peak == 1
        await engine.aclose()
