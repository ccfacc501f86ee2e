"""STARTTLS and AUTH: AUTH only over TLS, never during a transaction, failed logins answered
after a delay and limited per connection and per client IP, password checks off the loop,
STARTTLS twice or before EHLO refused, nothing sent before the handshake survives it."""
from __future__ import annotations

import asyncio
import base64
import threading

import pytest

from server.users import hash_password
from tests.security.harness import Client, code, until

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n.\r\n"


def plain(login: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{login}\0{password}".encode())


@pytest.fixture(scope="module")
def users_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("users") / "users"
    path.write_text(f"alice:{hash_password('right horse')}\n")
    return path


@pytest.fixture
async def login_relay(relays, users_file, server_tls):
    """A relay offering STARTTLS that knows alice (password 'right horse')."""
    return await relays(users=users_file, tls=server_tls)


async def tls_session(relay, client_tls, src="127.0.0.1", ehlo=True) -> Client:
    """A session after STARTTLS; with `ehlo`, also past the EHLO that must follow it."""
    client = await Client.connect(relay.port, src=src)
    assert b"STARTTLS" in await client.cmd(b"EHLO c.test")
    assert code(await client.cmd(b"STARTTLS")) == "220"
    await client.starttls(client_tls)
    if ehlo:
        await client.cmd(b"EHLO c.test")
    return client


async def test_auth_before_tls_is_refused_and_not_advertised(login_relay):
    client = await Client.connect(login_relay.port)
    reply = await client.cmd(b"EHLO c.test")
    assert b"AUTH" not in reply and b"STARTTLS" in reply
    assert code(await client.cmd(plain("alice", "right horse"))) == "538 5.7.11"
    await client.close()


async def test_auth_after_starttls_lets_an_outside_client_relay(relays, users_file, server_tls, client_tls):
    relay = await relays(users=users_file, tls=server_tls, relay_networks=("192.0.2.0/24",))
    client = await tls_session(relay, client_tls, ehlo=False)
    reply = await client.cmd(b"EHLO c.test")
    assert b"AUTH LOGIN PLAIN" in reply and b"STARTTLS" not in reply
    await client.cmd(b"MAIL FROM:<a@x.test>")
    assert code(await client.cmd(b"RCPT TO:<b@y.test>")) == "554 5.7.1"
    await client.cmd(b"RSET")
    assert code(await client.cmd(plain("alice", "right horse"))) == "235 2.7.0"
    await client.cmd(b"MAIL FROM:<a@x.test>")
    assert code(await client.cmd(b"RCPT TO:<b@y.test>")) == "250 2.1.5"
    await client.cmd(b"DATA")
    await client.send(MESSAGE)
    assert code(await client.reply()) == "250 2.0.0"
    assert [m.login for m in relay.handler.messages] == ["alice"]
    await client.close()


async def test_auth_login_dialog_and_cancel(login_relay, client_tls):
    client = await tls_session(login_relay, client_tls)
    assert code(await client.cmd(b"AUTH LOGIN")) == "334"
    assert code(await client.cmd(b"*")) == "501 5.7.0"
    assert code(await client.cmd(b"AUTH login " + base64.b64encode(b"alice"))) == "334"
    assert code(await client.cmd(base64.b64encode(b"right horse"))) == "235 2.7.0"
    assert code(await client.cmd(plain("alice", "right horse"))) == "503 5.5.1"
    await client.close()


async def test_malformed_and_unknown_auth(login_relay, client_tls):
    client = await tls_session(login_relay, client_tls)
    assert code(await client.cmd(b"AUTH PLAIN !!!")) == "501 5.5.2"
    assert code(await client.cmd(b"AUTH PLAIN " + base64.b64encode(b"no-separators"))) == "501 5.5.2"
    assert code(await client.cmd(b"AUTH CRAM-MD5")) == "504 5.5.4"
    await client.close()


async def test_auth_during_a_transaction_gets_503(login_relay, client_tls):
    client = await tls_session(login_relay, client_tls)
    assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "250 2.1.0"
    assert code(await client.cmd(plain("alice", "right horse"))) == "503 5.5.1"
    await client.close()


async def test_failed_logins_get_535_then_421_and_close(login_relay, client_tls):
    client = await tls_session(login_relay, client_tls)
    assert code(await client.cmd(plain("alice", "wrong"))) == "535 5.7.8"
    assert code(await client.cmd(plain("nobody", "wrong"))) == "535 5.7.8"   # same answer: no user oracle
    assert code(await client.cmd(plain("alice", "wrong"))) == "421 4.7.0"
    assert await client.closed()


async def test_failed_login_is_answered_after_the_delay(relays, users_file, server_tls, client_tls):
    from server.limits import Limits
    relay = await relays(users=users_file, tls=server_tls, limits=Limits(auth_failure_delay=0.5))
    client = await tls_session(relay, client_tls)
    await client.send(plain("alice", "wrong") + b"\r\n")
    with pytest.raises(asyncio.TimeoutError):
        await client.reply(timeout=0.2)            # not answered at once ...
    assert code(await client.reply()) == "535 5.7.8"   # ... but answered
    await client.close()


async def test_repeated_failures_from_one_ip_get_454_even_for_the_right_password(
        relays, users_file, server_tls, client_tls):
    from server.limits import Limits
    relay = await relays(users=users_file, tls=server_tls,
                         limits=Limits(auth_failure_delay=0.0, max_auth_failures_per_ip=4))
    for _ in range(2):
        client = await tls_session(relay, client_tls, src="127.0.0.20")
        assert code(await client.cmd(plain("alice", "wrong"))) == "535 5.7.8"
        assert code(await client.cmd(plain("alice", "wrong"))) == "535 5.7.8"
        await client.close()
    client = await tls_session(relay, client_tls, src="127.0.0.20")
    assert code(await client.cmd(plain("alice", "right horse"))) == "454 4.7.0"
    await client.close()
    other = await tls_session(relay, client_tls, src="127.0.0.21")   # another address is not affected
    await other.cmd(b"EHLO c.test")
    assert code(await other.cmd(plain("alice", "right horse"))) == "235 2.7.0"
    await other.close()


async def test_password_check_runs_off_the_event_loop(relays, server_tls, client_tls):
    release = threading.Event()
    entered = threading.Event()

    class SlowUsers:
        def verify(self, login, password):
            entered.set()
            release.wait(20)
            return False

    relay = await relays(users=SlowUsers(), tls=server_tls)
    client = await tls_session(relay, client_tls)
    try:
        await client.send(plain("alice", "x") + b"\r\n")
        await until(entered.is_set, what="the password check to start")
        # While the check blocks its thread, another session is served.
        other = await Client.connect(relay.port)
        assert code(await other.cmd(b"NOOP")) == "250"
        await other.close()
        release.set()
        assert code(await client.reply()) == "535 5.7.8"
    finally:
        release.set()
        await client.close()


async def test_implicit_tls_listener_offers_auth_and_no_starttls(relays, users_file, server_tls, client_tls):
    relay = await relays(users=users_file, tls=server_tls, implicit_tls=True)
    client = await Client.connect(relay.tls_port, tls=client_tls)
    reply = await client.cmd(b"EHLO c.test")
    assert b"AUTH LOGIN PLAIN" in reply and b"STARTTLS" not in reply
    assert code(await client.cmd(b"STARTTLS")) == "554 5.5.1"
    assert code(await client.cmd(plain("alice", "right horse"))) == "235 2.7.0"
    await client.close()


async def test_starttls_twice_and_before_ehlo(relays, server_tls, client_tls):
    relay = await relays(tls=server_tls)
    client = await Client.connect(relay.port)
    assert code(await client.cmd(b"STARTTLS")) == "503 5.5.1"
    assert code(await client.cmd(b"EHLO c.test")) == "250"
    assert code(await client.cmd(b"STARTTLS now")) == "501 5.5.4"
    assert code(await client.cmd(b"STARTTLS")) == "220"
    await client.starttls(client_tls)
    assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "503 5.5.1"   # EHLO again first
    await client.cmd(b"EHLO c.test")
    assert code(await client.cmd(b"STARTTLS")) == "554 5.5.1"
    assert code(await client.cmd(b"NOOP")) == "250"                        # still usable
    await client.close()


async def test_commands_sent_with_starttls_do_not_survive_the_handshake(
        relays, users_file, server_tls, client_tls):
    relay = await relays(users=users_file, tls=server_tls, relay_networks=("192.0.2.0/24",))
    client = await Client.connect(relay.port)
    await client.cmd(b"EHLO c.test")
    await client.send(b"STARTTLS\r\n" + plain("alice", "right horse") + b"\r\nMAIL FROM:<inj@x.test>\r\n")
    assert code(await client.reply()) == "220"
    await client.starttls(client_tls)
    assert code(await client.cmd(b"EHLO c.test")) == "250"     # the first reply after TLS is ours
    assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "250 2.1.0"   # no injected sender
    assert code(await client.cmd(b"RCPT TO:<b@y.test>")) == "554 5.7.1"     # not authenticated
    await client.close()
    assert relay.handler.messages == []


async def test_garbage_instead_of_a_tls_handshake_leaves_the_relay_serving(relays, server_tls):
    relay = await relays(tls=server_tls)
    client = await Client.connect(relay.port)
    await client.cmd(b"EHLO c.test")
    assert code(await client.cmd(b"STARTTLS")) == "220"
    await client.send(b"\x16\x03\x01garbage-not-a-client-hello" * 4)
    assert await client.closed()
    other = await Client.connect(relay.port)
    assert code(await other.cmd(b"EHLO c.test")) == "250"
    await other.close()


async def test_credentials_never_reach_the_log(login_relay, client_tls, caplog):
    caplog.set_level("DEBUG")
    client = await tls_session(login_relay, client_tls)
    assert code(await client.cmd(plain("alice", "wrong horse"))) == "535 5.7.8"
    assert code(await client.cmd(b"AUTH LOGIN " + base64.b64encode(b"alice"))) == "334"
    assert code(await client.cmd(base64.b64encode(b"right horse"))) == "235 2.7.0"
    await client.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "alice" in text   # the login is logged, the secrets are not
    for secret in ("wrong horse", "right horse", plain("alice", "wrong horse")[11:].decode(),
                   base64.b64encode(b"right horse").decode()):
        assert secret not in text


async def test_tls_closed_in_the_middle_of_data_queues_nothing(relays, server_tls, client_tls):
    relay = await relays(tls=server_tls)
    client = await tls_session(relay, client_tls)
    await client.cmd(b"MAIL FROM:<a@x.test>")
    await client.cmd(b"RCPT TO:<b@y.test>")
    assert code(await client.cmd(b"DATA")) == "354"
    await client.send(b"Subject: half\r\n\r\nhalf a message\r\n")
    await client.close()                       # close_notify mid-DATA
    other = await Client.connect(relay.port)
    assert code(await other.cmd(b"EHLO c.test")) == "250"
    await other.close()
    assert relay.handler.messages == []
