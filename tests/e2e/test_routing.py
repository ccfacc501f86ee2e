"""The relay as a user runs it: `routedsl serve routes.rules`, mail in over SMTP, mail out
through the engine the rules choose. Everything over loopback: a real relay subprocess,
fake MX hosts and smarthosts (aiosmtpd) with TLS and AUTH, a real UDP DNS server.

Hosts: 127.0.0.2 is the MX of example.net (direct engine), 127.0.0.3 the ISP's smarthost
(STARTTLS + AUTH), 127.0.0.4 "somehost" (implicit TLS + AUTH), 127.0.0.5 the provider
(STARTTLS + AUTH).
"""
from __future__ import annotations

import contextlib

import pytest

from tests.e2e.conftest import message, send
from tests.support.dns_server import DnsServer
from tests.support.fake_smtp import FakeSmtp, fake_mx_hosts, unused_port

pytestmark = pytest.mark.slow

ZONES = {
    "example.net": {"MX": [(10, "mx1.example.net")]},
    "mx1.example.net": {"A": ["127.0.0.2"]},
    "aol.com": {"MX": [(10, "mx1.example.net")]},
    "someprovider.com": {"MX": [(10, "mx1.example.net")]},
}
SECRETS = {"ISP_PASSWORD": "isp-secret", "PROVIDER_PASSWORD": "provider-secret"}


@contextlib.asynccontextmanager
async def world(tmp_path):
    """DNS, one MX host, and the three smarthosts of the seed."""
    pw = tmp_path / "somehost.pw"
    pw.write_text("somehost-secret\n")
    pw.chmod(0o600)
    async with DnsServer(ZONES) as dns, fake_mx_hosts(["127.0.0.2"]) as mx, \
            FakeSmtp("127.0.0.3", tls="starttls", auth=("me@someisp.com", "isp-secret")) as isp, \
            FakeSmtp("127.0.0.4", tls="implicit", auth=("me", "somehost-secret")) as somehost, \
            FakeSmtp("127.0.0.5", tls="starttls", auth=("youraccount@someprovider.com", "provider-secret")) as provider:
        yield dns, mx[0], isp, somehost, provider, pw


def engines(mx, isp, somehost, provider, pw, *, direct: bool = True, isp_port=None) -> str:
    lines = []
    if direct:
        lines.append(f"engine direct = direct port {mx.port} timeout 10s")
    lines += [
        f'engine isp = smtp://127.0.0.3:{isp_port or isp.port} user "me@someisp.com" password env:ISP_PASSWORD timeout 10s',
        f'engine somehost = smtps://127.0.0.4:{somehost.port} user "me" password file:{pw} timeout 10s',
        f'engine provider = smtp://127.0.0.5:{provider.port} user "youraccount@someprovider.com" '
        f"password env:PROVIDER_PASSWORD timeout 10s",
    ]
    return "\n".join(lines) + "\n"


SEED_RULES = """
If <destination mail server> is <aol.com>
then try this delivery engine first:[somehost]

If <from address> is <youraccount@someprovider.com>
then try this delivery engine first:[provider]

If <mail size> is larger than <2000kb>
then try this delivery engine first:[isp]
"""


async def test_the_seed_rules_send_each_message_through_its_engine(tmp_path, make_relay):
    async with world(tmp_path) as (dns, mx, isp, somehost, provider, pw):
        relay = make_relay(engines(mx, isp, somehost, provider, pw) + SEED_RULES,
                           nameserver=dns.nameserver, env=SECRETS)
        async with relay:
            reply = await send(relay, "me@home.test", ["friend@aol.com"],
                               message("me@home.test", ["friend@aol.com"], msgid="<aol@t>"))
            assert reply.startswith("2.0.0 Ok: queued as ")
            await send(relay, "youraccount@someprovider.com", ["bob@example.net"],
                       message("youraccount@someprovider.com", ["bob@example.net"], msgid="<prov@t>"))
            await send(relay, "me@home.test", ["bob@example.net"],
                       message("me@home.test", ["bob@example.net"], msgid="<big@t>", size=2_100_000))
            await send(relay, "me@home.test", ["carol@example.net"],
                       message("me@home.test", ["carol@example.net"], msgid="<small@t>"))

            (via_somehost,) = await somehost.wait_for(1)
            (via_provider,) = await provider.wait_for(1)
            (via_isp,) = await isp.wait_for(1)
            (via_direct,) = await mx.wait_for(1)
            log = (await relay.await_log(r".*engine=somehost rule=\S*routes\.rules:6 .*")).group(0)
    assert via_somehost.header("Message-ID") == "<aol@t>"
    assert (via_somehost.tls, via_somehost.user) == (True, "me")
    assert via_provider.header("Message-ID") == "<prov@t>"
    assert (via_provider.tls, via_provider.user) == (True, "youraccount@someprovider.com")
    assert via_isp.header("Message-ID") == "<big@t>" and len(via_isp.data) > 2_000_000
    assert via_direct.header("Message-ID") == "<small@t>"
    assert via_direct.recipients == ["carol@example.net"]
    # every message got a Received header naming the relay, and left through one engine
    assert via_direct.data.startswith(b"Received: from ")
    assert b"by relay.test (routedsl)" in via_direct.data.split(b"\r\n\r\n")[0]
    assert len(somehost.messages) + len(provider.messages) + len(isp.messages) + len(mx.messages) == 4
    # the delivery log names the deciding rule's line and the rules version
    assert "result=delivered" in log


async def test_failover_from_a_smarthost_to_direct_and_back(tmp_path, make_relay):
    async with world(tmp_path) as (dns, mx, isp, somehost, provider, pw):
        dead = unused_port("127.0.0.3")
        rules = engines(mx, isp, somehost, provider, pw, isp_port=dead) + (
            "if destination is example.net then try isp, direct first\n"
            "if destination is aol.com then try direct, somehost first\n")
        dns.fail("aol.com", "servfail")   # the direct engine cannot resolve aol.com
        relay = make_relay(rules, nameserver=dns.nameserver, env=SECRETS)
        async with relay:
            await send(relay, "me@home.test", ["bob@example.net"],
                       message("me@home.test", ["bob@example.net"], msgid="<to-direct@t>"))
            await send(relay, "me@home.test", ["friend@aol.com"],
                       message("me@home.test", ["friend@aol.com"], msgid="<to-smarthost@t>"))
            (direct,) = await mx.wait_for(1)
            (smarthost,) = await somehost.wait_for(1)
            await relay.await_log(r"engine=direct .*result=delivered")
            await relay.await_log(r"engine=somehost .*result=delivered")
            log = relay.log
    assert direct.header("Message-ID") == "<to-direct@t>"       # isp refused -> direct
    assert smarthost.header("Message-ID") == "<to-smarthost@t>"  # DNS failed -> somehost
    assert "engine=isp" in log and "engine=direct" in log


async def test_without_a_direct_engine_nothing_is_delivered_directly(tmp_path, make_relay):
    async with world(tmp_path) as (dns, mx, isp, somehost, provider, pw):
        relay = make_relay(engines(mx, isp, somehost, provider, pw, direct=False),
                           nameserver=dns.nameserver, env=SECRETS)
        isp.fail("MAIL", "451")   # even when the first smarthost fails temporarily
        async with relay:
            await send(relay, "me@home.test", ["bob@example.net"],
                       message("me@home.test", ["bob@example.net"], msgid="<nodirect@t>"))
            (got,) = await somehost.wait_for(1)
    assert got.header("Message-ID") == "<nodirect@t>"
    assert mx.connections == 0
    assert dns.queries["example.net"] == 0


async def test_recipients_are_split_by_plan(tmp_path, make_relay):
    async with world(tmp_path) as (dns, mx, isp, somehost, provider, pw):
        relay = make_relay(engines(mx, isp, somehost, provider, pw) + SEED_RULES,
                           nameserver=dns.nameserver, env=SECRETS)
        async with relay:
            rcpts = ["friend@aol.com", "pal@aol.com", "bob@example.net"]
            await send(relay, "me@home.test", rcpts, message("me@home.test", rcpts, msgid="<split@t>"))
            (to_aol,) = await somehost.wait_for(1)
            (to_net,) = await mx.wait_for(1)
    assert sorted(to_aol.recipients) == ["friend@aol.com", "pal@aol.com"]   # one transaction
    assert to_net.recipients == ["bob@example.net"]
    assert to_aol.header("Message-ID") == to_net.header("Message-ID") == "<split@t>"
