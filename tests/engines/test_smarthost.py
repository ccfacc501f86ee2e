"""The smarthost engine against in-loop fakes: TLS, AUTH, verification, reuse and limits."""
from __future__ import annotations

import asyncio
import ssl

import pytest

from server.engines.base import build_engine
from server.outcome import Kind
from tests.engines.helpers import context, envelope, smarthost_spec
from tests.support import certs
from tests.support.fake_smtp import EVIL_REPLY, FakeSmtp, unused_port

USER, PASSWORD = "me@isp.test", "s3cret pass"


def _engine(fake: FakeSmtp, *, secret: str | None = None, ca: bool = True, final_timeout: float = 10.0,
            **options):
    kind = "smtps" if fake.tls == "implicit" else "smtp"
    spec = smarthost_spec(port=fake.port, host=options.pop("host", fake.host), kind=kind, **options)
    ctx = context(ca_file=certs.ca_file() if ca else None, final_timeout=final_timeout)
    return build_engine(spec, secret, ctx)


async def _send(engine, rcpts=("bob@ok.test",), **env):
    try:
        return await engine.deliver(envelope(**env), list(rcpts))
    finally:
        await engine.aclose()


async def test_starttls_verified_with_the_context_ca():
    async with FakeSmtp(tls="starttls") as fake:
        got = await _send(_engine(fake, tls="required"))
        assert got["bob@ok.test"].delivered, got
        assert fake.messages[0].tls and "STARTTLS" in fake.commands


async def test_implicit_tls():
    async with FakeSmtp(tls="implicit") as fake:
        got = await _send(_engine(fake))
        assert got["bob@ok.test"].delivered, got
        assert fake.messages[0].tls


async def test_helo_name_from_the_spec_or_the_context():
    async with FakeSmtp() as fake:
        await _send(_engine(fake, tls="none", helo="mail.home.test"))
        await _send(_engine(fake, tls="none"))
        assert [m.helo for m in fake.messages] == ["mail.home.test", "relay.test"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_after_starttls(mechanism):
    async with FakeSmtp(tls="starttls", auth=(USER, PASSWORD), auth_mechanisms=(mechanism,)) as fake:
        got = await _send(_engine(fake, user=USER, secret=PASSWORD))
        assert got["bob@ok.test"].delivered, got
        assert fake.messages[0].user == USER
        assert f"AUTH {mechanism}" in fake.commands
        assert fake.commands.index("STARTTLS") < fake.commands.index(f"AUTH {mechanism}")


async def test_auth_over_implicit_tls():
    async with FakeSmtp(tls="implicit", auth=(USER, PASSWORD)) as fake:
        got = await _send(_engine(fake, user=USER, secret=PASSWORD))
        assert got["bob@ok.test"].delivered and fake.messages[0].user == USER


async def test_bad_password_is_an_engine_fault():
    async with FakeSmtp(tls="starttls", auth=(USER, PASSWORD)) as fake:
        got = await _send(_engine(fake, user=USER, secret="wrong"))
        o = got["bob@ok.test"]
        assert (o.kind, o.final, o.code) == (Kind.TEMPORARY, False, 535)
        assert "MAIL" not in fake.commands and not fake.messages


@pytest.mark.parametrize("tls", ["required", "opportunistic"])
async def test_credentials_are_never_sent_without_tls(tls):
    # the server even offers AUTH in plaintext; we must not use it
    async with FakeSmtp(auth=(USER, PASSWORD), auth_require_tls=False) as fake:
        got = await _send(_engine(fake, user=USER, secret=PASSWORD, tls=tls))
        o = got["bob@ok.test"]
        assert o.temporary and not o.final and o.enhanced == "4.7.4"
        assert not any(c.startswith("AUTH") for c in fake.commands)
        assert "MAIL" not in fake.commands


async def test_tls_required_without_starttls_offered():
    async with FakeSmtp() as fake:
        got = await _send(_engine(fake, tls="required"))
        assert got["bob@ok.test"].temporary and not fake.messages


async def test_untrusted_certificate_is_an_engine_fault_starttls():
    async with FakeSmtp(tls="starttls", ssl_context=certs.untrusted_server_context(),
                        auth=(USER, PASSWORD)) as fake:
        got = await _send(_engine(fake, user=USER, secret=PASSWORD))
        o = got["bob@ok.test"]
        assert (o.kind, o.final, o.enhanced) == (Kind.TEMPORARY, False, "4.7.5")
        assert not any(c.startswith("AUTH") for c in fake.commands) and not fake.messages


async def test_untrusted_certificate_is_an_engine_fault_implicit():
    async with FakeSmtp(tls="implicit", ssl_context=certs.untrusted_server_context()) as fake:
        got = await _send(_engine(fake))
        o = got["bob@ok.test"]
        assert (o.kind, o.enhanced) == (Kind.TEMPORARY, "4.7.5") and not fake.messages


async def test_ca_file_is_needed_to_trust_the_test_ca():
    async with FakeSmtp(tls="starttls") as fake:
        got = await _send(_engine(fake, tls="required", ca=False))
        assert got["bob@ok.test"].enhanced == "4.7.5" and not fake.messages


async def test_host_name_is_verified():
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certs.ca().issue_cert("elsewhere.test").configure_cert(context)  # trusted CA, wrong name
    async with FakeSmtp(tls="implicit", ssl_context=context) as fake:
        got = await _send(_engine(fake))
        assert got["bob@ok.test"].enhanced == "4.7.5" and not fake.messages


async def test_verify_no_accepts_any_certificate():
    async with FakeSmtp(tls="starttls", ssl_context=certs.untrusted_server_context(),
                        auth=(USER, PASSWORD)) as fake:
        got = await _send(_engine(fake, user=USER, secret=PASSWORD, verify=False, ca=False))
        assert got["bob@ok.test"].delivered and fake.messages[0].user == USER


async def test_connection_refused_is_an_engine_fault():
    engine = build_engine(smarthost_spec(port=unused_port(), tls="none"), None, context())
    got = await _send(engine)
    assert got["bob@ok.test"].temporary and got["bob@ok.test"].enhanced == "4.4.1"


async def test_ehlo_size_too_small_skips_without_sending():
    async with FakeSmtp(size=1000) as fake:
        got = await _send(_engine(fake, tls="none"), size=5000)
        o = got["bob@ok.test"]
        assert (o.kind, o.final, o.code, o.enhanced) == (Kind.PERMANENT, False, 552, "5.3.4")
        assert "MAIL" not in fake.commands


async def test_max_size_option_skips_without_connecting():
    async with FakeSmtp() as fake:
        got = await _send(_engine(fake, tls="none", max_size=1000), size=5000)
        assert got["bob@ok.test"].enhanced == "5.3.4" and fake.connections == 0


async def test_size_is_declared_in_mail_from():
    async with FakeSmtp() as fake:
        env = envelope()
        engine = _engine(fake, tls="none")
        await engine.deliver(env, ["bob@ok.test"])
        await engine.aclose()
        assert f"SIZE={len(env.data)}" in fake.messages[0].options


async def test_partial_rcpt_acceptance():
    async with FakeSmtp() as fake:
        fake.fail_local("later", "451 4.2.0 mailbox busy")
        fake.fail_local("gone", "550 5.1.1 no such user")
        rcpts = ["ok@ok.test", "later@ok.test", "gone@ok.test", "also@ok.test"]
        got = await _send(_engine(fake, tls="none"), rcpts)
        assert got["ok@ok.test"].delivered and got["also@ok.test"].delivered
        assert got["later@ok.test"].temporary and got["later@ok.test"].enhanced == "4.2.0"
        assert got["gone@ok.test"].final and got["gone@ok.test"].code == 550
        assert [m.recipients for m in fake.messages] == [["ok@ok.test", "also@ok.test"]]
        assert fake.commands.count("DATA") == 1


async def test_all_refused_sends_no_data():
    async with FakeSmtp() as fake:
        fake.fail("RCPT", "550")
        got = await _send(_engine(fake, tls="none"), ["a@ok.test", "b@ok.test"])
        assert all(o.final for o in got.values())
        assert "DATA" not in fake.commands


async def test_data_reply_applies_to_every_accepted_recipient():
    async with FakeSmtp() as fake:
        fake.fail("DATA", "554 5.7.1 rejected as spam")
        got = await _send(_engine(fake, tls="none"), ["a@ok.test", "b@ok.test"])
        assert {(o.kind, o.final, o.code) for o in got.values()} == {(Kind.PERMANENT, False, 554)}


async def test_connection_reuse_one_connection_one_auth():
    async with FakeSmtp(tls="starttls", auth=(USER, PASSWORD)) as fake:
        engine = _engine(fake, user=USER, secret=PASSWORD)
        for i in range(3):
            got = await engine.deliver(envelope(queue_id=f"Q{i}"), ["bob@ok.test"])
            assert got["bob@ok.test"].delivered
        await engine.aclose()
        assert fake.connections == 1 and len(fake.messages) == 3
        assert sum(c.startswith("AUTH") for c in fake.commands) == 1
        assert "RSET" not in fake.commands  # a clean transaction needs no RSET before the next


async def test_a_failed_transaction_leaves_a_reusable_connection():
    async with FakeSmtp() as fake:
        engine = _engine(fake, tls="none")
        fake.fail("RCPT", "550", times=1)
        first = await engine.deliver(envelope(), ["bob@ok.test"])
        second = await engine.deliver(envelope(), ["bob@ok.test"])
        await engine.aclose()
        assert first["bob@ok.test"].final and second["bob@ok.test"].delivered
        assert fake.connections == 1


async def test_a_pooled_connection_that_died_is_replaced():
    async with FakeSmtp() as fake:
        engine = _engine(fake, tls="none")
        assert (await engine.deliver(envelope(), ["bob@ok.test"]))["bob@ok.test"].delivered
        port = fake.port
        await fake.stop()  # closes the idle connection under the engine's feet
        fake.port = port
        await fake.start()
        got = await engine.deliver(envelope(), ["bob@ok.test"])
        await engine.aclose()
        assert got["bob@ok.test"].delivered and len(fake.messages) == 2


async def test_idle_connections_are_closed_after_the_idle_timeout():
    async with FakeSmtp() as fake:
        spec = smarthost_spec(port=fake.port, tls="none")
        engine = build_engine(spec, None, context(pool_idle=0.2))
        await engine.deliver(envelope(), ["bob@ok.test"])
        assert engine.pool.open_connections == 1
        for _ in range(200):
            if engine.pool.open_connections == 0 and fake.active == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.pool.open_connections == 0 and fake.active == 0
        await engine.aclose()


async def test_connections_limit_is_respected():
    async with FakeSmtp() as fake:
        fake.fail("DATA", "delay 0.2")
        engine = _engine(fake, tls="none", connections=2)
        results = await asyncio.gather(*(engine.deliver(envelope(queue_id=f"Q{i}"), [f"r{i}@ok.test"])
                                         for i in range(6)))
        await engine.aclose()
        assert all(r[f"r{i}@ok.test"].delivered for i, r in enumerate(results))
        assert fake.peak == 2 and fake.connections == 2
        assert len(fake.messages) == 6


async def test_final_dot_waits_longer_than_the_command_timeout():
    async with FakeSmtp() as fake:
        fake.fail("DATA", "delay 1.0")
        got = await _send(_engine(fake, tls="none", timeout=0.4, final_timeout=5.0))
        assert got["bob@ok.test"].delivered


async def test_a_stalled_server_is_a_temporary_fault():
    async with FakeSmtp() as fake:
        fake.fail("MAIL", "stall")
        got = await _send(_engine(fake, tls="none", timeout=0.3))
        assert got["bob@ok.test"].temporary and got["bob@ok.test"].enhanced == "4.4.2"


async def test_evil_multiline_reply_is_cleaned():
    async with FakeSmtp() as fake:
        fake.fail("RCPT", EVIL_REPLY)
        got = await _send(_engine(fake, tls="none"))
        o = got["bob@ok.test"]
        assert o.final and o.enhanced == "5.1.1"
        for bad in ("\x1b", "\r", "\n"):
            assert bad not in o.reply and bad not in o.text
        assert o.reply.startswith("550 5.1.1 x ")


async def test_null_sender_is_sent_as_empty_path():
    async with FakeSmtp() as fake:
        got = await _send(_engine(fake, tls="none"), sender="")
        assert got["bob@ok.test"].delivered and fake.messages[0].sender == ""


async def test_aclose_waits_for_deliveries_in_flight():
    async with FakeSmtp() as fake:
        fake.fail("DATA", "delay 0.3")
        engine = _engine(fake, tls="none")
        delivery = asyncio.create_task(engine.deliver(envelope(), ["bob@ok.test"]))
        while "MAIL" not in fake.commands:
            await asyncio.sleep(0.01)
        await engine.aclose()
        assert delivery.done() and delivery.result()["bob@ok.test"].delivered
        assert fake.commands[-1] == "QUIT"
        late = await engine.deliver(envelope(), ["bob@ok.test"])
        assert late["bob@ok.test"].temporary


async def test_duplicate_recipients_get_one_rcpt():
    async with FakeSmtp() as fake:
        got = await _send(_engine(fake, tls="none"), ["bob@ok.test", "bob@ok.test"])
        assert list(got) == ["bob@ok.test"] and fake.commands.count("RCPT") == 1


async def test_too_many_recipients_continue_in_a_second_transaction():
    async with FakeSmtp() as fake:
        engine = _engine(fake, tls="none")
        fake.fail_local("c", "452 4.5.3 Too many recipients", times=1)
        got = await _send(engine, ["a@ok.test", "b@ok.test", "c@ok.test"])
        assert all(o.delivered for o in got.values()), got
        assert [m.recipients for m in fake.messages] == [["a@ok.test", "b@ok.test"], ["c@ok.test"]]
        assert fake.connections == 1


async def test_garbage_reply_is_temporary_and_the_connection_is_dropped():
    async with FakeSmtp() as fake:
        engine = _engine(fake, tls="none")
        fake.fail("MAIL", "abc", times=1)
        first = await engine.deliver(envelope(), ["bob@ok.test"])
        second = await engine.deliver(envelope(), ["bob@ok.test"])
        await engine.aclose()
        assert first["bob@ok.test"].temporary and first["bob@ok.test"].code is None
        assert second["bob@ok.test"].delivered and fake.connections == 2


async def test_smtputf8_message_to_a_server_that_speaks_it():
    from server.engines.base import Envelope
    async with FakeSmtp(smtputf8=True) as fake:
        data = "From: jörg@home.test\r\nTo: jürgen@bücher.test\r\nSubject: ü\r\n\r\nhallo\r\n".encode()
        engine = _engine(fake, tls="none")
        got = await engine.deliver(Envelope("Q1", "jörg@home.test", data, smtputf8=True),
                                   ["jürgen@bücher.test"])
        await engine.aclose()
        assert got["jürgen@bücher.test"].delivered, got
        assert fake.messages[0].recipients == ["jürgen@bücher.test"]
        assert "SMTPUTF8" in fake.messages[0].options and "BODY=8BITMIME" in fake.messages[0].options


async def test_smtputf8_message_to_a_server_that_does_not_is_skipped():
    from server.engines.base import Envelope
    async with FakeSmtp(smtputf8=False) as fake:
        engine = _engine(fake, tls="none")
        got = await engine.deliver(Envelope("Q1", "jörg@home.test", b"Subject: x\r\n\r\nx\r\n",
                                            smtputf8=True), ["jürgen@bücher.test"])
        await engine.aclose()
        o = got["jürgen@bücher.test"]
        assert (o.kind, o.final, o.enhanced) == (Kind.PERMANENT, False, "5.6.7")
        assert "MAIL" not in fake.commands


async def test_non_ascii_address_without_smtputf8_is_refused_locally():
    async with FakeSmtp() as fake:
        got = await _send(_engine(fake, tls="none"), ["ok@ok.test", "jürgen@bücher.test"])
        assert got["ok@ok.test"].delivered
        assert got["jürgen@bücher.test"].permanent and got["jürgen@bücher.test"].enhanced == "5.6.7"
        assert fake.messages[0].recipients == ["ok@ok.test"]


async def test_a_server_stalling_before_354_is_given_the_command_timeout_only():
    async with FakeSmtp() as fake:
        fake.fail("DATACMD", "stall")
        got = await asyncio.wait_for(_send(_engine(fake, tls="none", timeout=0.3,
                                                   final_timeout=60.0)), 10)
        assert got["bob@ok.test"].temporary and got["bob@ok.test"].enhanced == "4.4.2"
        assert not fake.messages


async def test_data_command_refused_before_354():
    async with FakeSmtp() as fake:
        fake.fail("DATACMD", "451", times=1)
        engine = _engine(fake, tls="none")
        first = await engine.deliver(envelope(), ["bob@ok.test"])
        second = await engine.deliver(envelope(), ["bob@ok.test"])
        await engine.aclose()
        assert first["bob@ok.test"].temporary and first["bob@ok.test"].code == 451
        assert second["bob@ok.test"].delivered and fake.connections == 1


async def test_dot_stuffing_and_line_ends_reach_the_server_intact():
    from server.engines.base import Envelope
    data = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nlast line without CRLF"
    async with FakeSmtp() as fake:
        engine = _engine(fake, tls="none")
        got = await engine.deliver(Envelope("Q1", "a@home.test", data), ["bob@ok.test"])
        await engine.aclose()
        assert got["bob@ok.test"].delivered
        assert fake.messages[0].data == data + b"\r\n"


async def test_421_in_the_middle_fails_everyone_temporarily():
    async with FakeSmtp() as fake:
        fake.fail_local("second", "421")
        got = await _send(_engine(fake, tls="none"), ["first@ok.test", "second@ok.test", "third@ok.test"])
        assert {(o.kind, o.final) for o in got.values()} == {(Kind.TEMPORARY, False)}
        assert not fake.messages


async def test_no_user_means_no_auth_and_tls_none_means_no_starttls():
    async with FakeSmtp(tls="starttls", auth=(USER, PASSWORD)) as fake:
        got = await _send(_engine(fake, tls="none"))
        assert got["bob@ok.test"].delivered
        assert not any(c.startswith("AUTH") or c == "STARTTLS" for c in fake.commands)
        assert not fake.messages[0].tls
