"""The scheduler with DNS: `mx` rules (MX names looked up before planning) and the direct engine."""
from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass
from pathlib import Path

from routedsl.table import Decision, EngineSpec, RuleRef
from server.engines.base import EngineContext, build_engine
from tests.queue.support import MESSAGE, running, smarthost, until
from tests.support.dns_server import DnsServer
from tests.support.fake_smtp import FakeSmtp


@dataclass
class MxTable:
    """`to mx mx.bigmail.test use a` as a table: mail for domains served by that MX goes via a."""
    version: str = "mxmxmxmxmxmx"
    needs_mx: bool = True

    def plan(self, recipient: str, sender: str = "", size: int = 0, mx: tuple[str, ...] = ()) -> Decision:
        if "mx.bigmail.test" in mx:
            return Decision(("a",), RuleRef("routes.rules", 3, "to mx mx.bigmail.test use a"))
        return Decision(("b",), None)


async def test_mx_rules_plan_with_looked_up_names_once_per_domain(tmp_path: Path) -> None:
    zones = {"big.test": {"MX": [(10, "mx.bigmail.test")]}, "small.test": {"MX": [(10, "mx.small.test")]}}
    async with DnsServer(zones) as dns_server, FakeSmtp() as a, FakeSmtp() as b:
        ctx = EngineContext(hostname="relay.test", nameservers=(dns_server.nameserver,))
        engines = {"a": smarthost("a", a.port, ctx), "b": smarthost("b", b.port, ctx)}
        async with running(tmp_path, MxTable(), engines, mx_context=ctx) as (sched, spool):
            sched.wake(await spool.accept("alice@home.test", ["x@big.test", "y@small.test", "z@big.test"], MESSAGE))
            await a.wait_for(1)
            await b.wait_for(1)
            await until(lambda: not spool.messages())
        assert sorted(a.messages[0].recipients) == ["x@big.test", "z@big.test"]
        assert b.messages[0].recipients == ["y@small.test"]
        assert dns_server.queries_by_type[("big.test", "MX")] == 1


async def test_direct_engine_delivers_to_the_mx_and_null_mx_bounces(tmp_path: Path) -> None:
    zones = {"ok.test": {"MX": [(10, "mx1.ok.test")]}, "mx1.ok.test": {"A": ["127.0.0.2"]},
             "home.test": {"MX": [(10, "mx.home.test")]}, "mx.home.test": {"A": ["127.0.0.3"]}}
    async with DnsServer(zones) as dns_server, FakeSmtp("127.0.0.2") as mx:
        async with FakeSmtp("127.0.0.3", mx.port) as home:
            dns_server.null_mx("nomail.test")
            ctx = EngineContext(hostname="relay.test", nameservers=(dns_server.nameserver,))
            direct = build_engine(EngineSpec(name="direct", kind="direct", host=None, port=mx.port,
                                             timeout=5.0), None, ctx)
            from tests.queue.support import Table
            async with running(tmp_path, Table(("direct",)), {"direct": direct}, mx_context=ctx) as (sched, spool):
                sched.wake(await spool.accept("alice@home.test", ["bob@ok.test", "nobody@nomail.test"], MESSAGE))
                got = await mx.wait_for(1)
                bounces = await home.wait_for(1)
                await until(lambda: not spool.messages())
            assert got[0].recipients == ["bob@ok.test"]
            report = email.message_from_bytes(bounces[0].data, policy=email.policy.default)
            block = list(report.iter_parts())[1].get_payload()[1]
            assert block["Final-Recipient"] == "rfc822; nobody@nomail.test"
            assert block["Status"] == "5.1.10"
            assert bounces[0].sender == ""
