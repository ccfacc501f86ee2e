"""What the sender sees when delivery does not simply work: retries, bounces, delay notices.

The relay delivers everything for example.net through the smarthost `out` (a fake on
127.0.0.3) and routes its own notices by the same rules: mail for home.test (the
senders' domain) goes through `home` (a fake on 127.0.0.6), so a bounce arrives where the
sender's mail server would receive it.
"""
from __future__ import annotations

import contextlib

import pytest

from tests.e2e.conftest import dsn_fields, header, human_part, message, rules_with_home, send
from tests.support.fake_smtp import FakeSmtp

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def sinks():
    async with FakeSmtp("127.0.0.3") as out, FakeSmtp("127.0.0.6") as home:
        yield out, home


def rules(out: FakeSmtp, home: FakeSmtp) -> str:
    return rules_with_home(home, "example.net", "out", f"smtp://{out.host}:{out.port}", timeout="5s")


async def test_a_temporary_failure_is_retried_then_delivered(make_relay):
    async with sinks() as (out, home):
        out.fail("RCPT", "451", times=2)
        relay = make_relay(rules(out, home), min_backoff="0.5s", max_backoff="0.5s")
        async with relay:
            await send(relay, "me@home.test", ["bob@example.net"],
                       message("me@home.test", ["bob@example.net"], msgid="<retry@t>"))
            (got,) = await out.wait_for(1, timeout=20)
            await relay.await_log("result=delivered")
            log = relay.log
    assert got.header("Message-ID") == "<retry@t>"
    assert log.count("result=temporary") == 2 and log.count("result=delivered") == 1
    assert home.messages == []                      # no bounce, no delay notice


async def test_an_unknown_user_bounces_at_once_with_the_reply(make_relay):
    async with sinks() as (out, home):
        out.fail_local("nobody", "550 5.1.1 <nobody@example.net>: no such user")
        relay = make_relay(rules(out, home))
        async with relay:
            rcpts = ["nobody@example.net", "bob@example.net"]
            await send(relay, "me@home.test", rcpts, message("me@home.test", rcpts, msgid="<511@t>"))
            (bounce,) = await home.wait_for(1)
            (delivered,) = await out.wait_for(1)
            await relay.await_log("result=delivered")
            log = relay.log
    assert delivered.recipients == ["bob@example.net"]
    assert bounce.sender == "" and bounce.recipients == ["me@home.test"]
    fields = dsn_fields(bounce.data)
    assert fields["action"] == "failed"
    assert fields["status"] == "5.1.1"
    assert "nobody@example.net" in fields["final-recipient"]
    assert "550 5.1.1" in fields["diagnostic-code"]
    assert "out" in human_part(bounce.data)          # names the engine tried
    assert header(bounce.data, "Auto-Submitted") == "auto-replied"
    assert log.count("result=final") == 1            # no retry, no other engine


async def test_mail_still_undeliverable_after_the_queue_lifetime_bounces(make_relay):
    async with sinks() as (out, home):
        out.fail("RCPT", "451")
        relay = make_relay(rules(out, home), args=["--queue-lifetime", "1s"])
        async with relay:
            await send(relay, "me@home.test", ["bob@example.net"],
                       message("me@home.test", ["bob@example.net"], msgid="<life@t>"))
            (bounce,) = await home.wait_for(1, timeout=20)
    fields = dsn_fields(bounce.data)
    assert fields["action"] == "failed"
    assert fields["status"].startswith("4.")         # the last reply was temporary
    assert "451" in fields["diagnostic-code"]
    assert out.messages == []


async def test_a_failure_from_the_null_sender_is_never_bounced(make_relay):
    async with sinks() as (out, home):
        out.fail_local("nobody", "550 5.1.1 no such user")
        relay = make_relay(rules(out, home))
        async with relay:
            await send(relay, "", ["nobody@example.net"], message("", ["nobody@example.net"], msgid="<null@t>"))
            await relay.await_log(r"discarded")
            # a message sent after it arrives, so the relay was not stuck on the first one
            await send(relay, "me@home.test", ["bob@example.net"],
                       message("me@home.test", ["bob@example.net"], msgid="<after@t>"))
            await out.wait_for(1)
    assert home.messages == [] and home.connections == 0


async def test_one_delay_notice_then_delivery(make_relay):
    async with sinks() as (out, home):
        out.fail("RCPT", "451", times=3)
        relay = make_relay(rules(out, home), min_backoff="0.5s", max_backoff="0.5s",
                           args=["--delay-warning", "1s"])
        async with relay:
            await send(relay, "me@home.test", ["bob@example.net"],
                       message("me@home.test", ["bob@example.net"], msgid="<slow@t>"))
            (notice,) = await home.wait_for(1, timeout=20)
            (got,) = await out.wait_for(1, timeout=20)
    assert got.header("Message-ID") == "<slow@t>"
    assert len(home.messages) == 1                    # one notice, not one per retry
    assert notice.sender == ""
    assert dsn_fields(notice.data)["action"] == "delayed"
