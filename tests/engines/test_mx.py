"""MX resolution against a real UDP DNS server: order, null MX, fallback and failures."""
from __future__ import annotations

import collections

from server.engines.mx import mx_names, resolve
from server.outcome import Kind
from tests.engines.helpers import context
from tests.support.dns_server import DnsServer

ZONES = {
    "ok.test": {"MX": [(20, "mx2.ok.test"), (10, "mx1.ok.test")]},
    "mx1.ok.test": {"A": ["127.0.0.2"]},
    "mx2.ok.test": {"A": ["127.0.0.3"], "AAAA": ["::1"]},
    "equal.test": {"MX": [(10, "a.equal.test"), (10, "b.equal.test")]},
    "a.equal.test": {"A": ["127.0.0.2"]},
    "b.equal.test": {"A": ["127.0.0.3"]},
    "plain.test": {"A": ["127.0.0.4"]},
    "nomail.test": {"MX": [(0, ".")]},
    "ghost.test": {"MX": [(10, "gone.ghost.test")]},
    "bare.test": {"TXT": ["v=spf1 -all"]},
    "alias.test": {"CNAME": "ok.test"},
}


async def test_preference_order_and_addresses():
    async with DnsServer(ZONES) as server:
        got = await resolve("OK.test.", context(server.nameserver))
    assert got.outcome is None and not got.implicit
    assert [(h.name, h.preference, h.addresses) for h in got.hosts] == [
        ("mx1.ok.test", 10, ("127.0.0.2",)),
        ("mx2.ok.test", 20, ("127.0.0.3", "::1")),
    ]


async def test_equal_preference_hosts_are_both_used_first():
    firsts = collections.Counter()
    async with DnsServer(ZONES) as server:
        ctx = context(server.nameserver)
        for _ in range(60):
            got = await resolve("equal.test", ctx)
            firsts[got.hosts[0].name] += 1
            assert {h.name for h in got.hosts} == {"a.equal.test", "b.equal.test"}
    assert firsts["a.equal.test"] >= 10 and firsts["b.equal.test"] >= 10


async def test_no_mx_falls_back_to_the_address_record():
    async with DnsServer(ZONES) as server:
        got = await resolve("plain.test", context(server.nameserver))
    assert got.implicit
    assert [(h.name, h.addresses) for h in got.hosts] == [("plain.test", ("127.0.0.4",))]


async def test_null_mx_is_final_and_looks_nothing_else_up():
    async with DnsServer(ZONES) as server:
        got = await resolve("nomail.test", context(server.nameserver))
        assert server.queries == {"nomail.test": 1}
    assert got.hosts == ()
    assert (got.outcome.kind, got.outcome.final, got.outcome.code, got.outcome.enhanced) == \
        (Kind.PERMANENT, True, 556, "5.1.10")


async def test_nxdomain_is_final():
    async with DnsServer(ZONES) as server:
        got = await resolve("nowhere.test", context(server.nameserver))
    assert (got.outcome.kind, got.outcome.final, got.outcome.enhanced) == (Kind.PERMANENT, True, "5.1.2")


async def test_servfail_is_temporary():
    async with DnsServer(ZONES) as server:
        server.fail("ok.test", "servfail")
        got = await resolve("ok.test", context(server.nameserver))
    assert (got.outcome.kind, got.outcome.final, got.outcome.enhanced) == (Kind.TEMPORARY, False, "4.4.3")


async def test_timeout_is_temporary():
    async with DnsServer(ZONES) as server:
        server.fail("ok.test", "timeout")
        got = await resolve("ok.test", context(server.nameserver, dns_timeout=0.5))
        assert server.queries["ok.test"] >= 1
    assert (got.outcome.kind, got.outcome.enhanced) == (Kind.TEMPORARY, "4.4.3")


async def test_servfail_then_success():
    async with DnsServer(ZONES) as server:
        ctx = context(server.nameserver)
        server.fail("ok.test", "servfail", times=1)
        first = await resolve("ok.test", ctx)
        second = await resolve("ok.test", ctx)
    assert first.outcome is not None and first.outcome.temporary
    assert second.outcome is None and second.hosts[0].name == "mx1.ok.test"


async def test_mx_hosts_without_addresses_cannot_be_routed():
    async with DnsServer(ZONES) as server:
        got = await resolve("ghost.test", context(server.nameserver))
    assert (got.outcome.kind, got.outcome.final, got.outcome.enhanced) == (Kind.PERMANENT, False, "5.4.4")


async def test_mx_host_lookup_failing_temporarily_is_temporary():
    async with DnsServer(ZONES) as server:
        server.fail("mx1.ok.test", "servfail")
        server.fail("mx2.ok.test", "servfail")
        got = await resolve("ok.test", context(server.nameserver))
    assert got.outcome is not None and got.outcome.temporary


async def test_one_mx_host_failing_leaves_the_others():
    async with DnsServer(ZONES) as server:
        server.fail("mx1.ok.test", "servfail")
        got = await resolve("ok.test", context(server.nameserver))
    assert [h.name for h in got.hosts] == ["mx2.ok.test"]


async def test_no_mx_and_no_address():
    async with DnsServer(ZONES) as server:
        got = await resolve("bare.test", context(server.nameserver))
    assert got.outcome is not None and got.outcome.enhanced == "5.4.4"


async def test_cname_to_a_domain_with_mx():
    async with DnsServer(ZONES) as server:
        got = await resolve("alias.test", context(server.nameserver))
    assert [h.name for h in got.hosts] == ["mx1.ok.test", "mx2.ok.test"]


async def test_answers_are_cached_per_context():
    async with DnsServer(ZONES, ttl=60) as server:
        ctx = context(server.nameserver)
        await resolve("ok.test", ctx)
        await resolve("ok.test", ctx)
        assert server.queries_by_type[("ok.test", "MX")] == 1


async def test_mx_names_for_rules():
    async with DnsServer(ZONES) as server:
        ctx = context(server.nameserver)
        assert await mx_names("ok.test", ctx) == ("mx1.ok.test", "mx2.ok.test")
        assert await mx_names("plain.test", ctx) == ()
        assert await mx_names("nomail.test", ctx) == ()
        assert await mx_names("nowhere.test", ctx) == ()
        server.fail("down.test", "servfail")
        assert await mx_names("down.test", ctx) == ()


async def test_a_domain_that_cannot_be_a_dns_name_is_final():
    async with DnsServer(ZONES) as server:
        ctx = context(server.nameserver)
        for bad in ("a..b", "x" * 64 + ".test", ("abc." * 70) + "test"):
            got = await resolve(bad, ctx)
            assert got.outcome is not None and got.outcome.final, bad
            assert got.outcome.enhanced == "5.1.2"
        assert sum(server.queries.values()) == 0
