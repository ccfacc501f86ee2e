"""`routedsl serve` as an operator meets it: start-up, refusals, SIGHUP, graceful stop."""
from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys

import pytest

from tests.e2e.conftest import message, send
from tests.support.fake_smtp import FakeSmtp
from tests.support import certs
from tests.support.poll import until
from tests.support.relay import RelayExited

pytestmark = pytest.mark.slow


def serve(tmp_path, rules: str, *args: str, env=None) -> subprocess.CompletedProcess:
    path = tmp_path / "routes.rules"
    path.write_text(rules)
    return subprocess.run(
        [sys.executable, "-m", "routedsl", "serve", str(path), "--listen", "127.0.0.1:0",
         "--spool", str(tmp_path / "spool"), *args],
        capture_output=True, text=True, timeout=60, env=env)


def test_an_invalid_rules_file_is_refused_with_the_check_diagnostics(tmp_path):
    done = serve(tmp_path, "engine isp = smtp://127.0.0.3:2525 tls none\n"
                           "if destination is aol.com then try ips first\n")
    assert done.returncode == 1
    assert "routes.rules:2:" in done.stderr and "error[unknown-engine]" in done.stderr
    assert "did you mean 'isp'" in done.stderr
    assert "refusing to start" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_secret_is_refused_naming_the_engine_line(tmp_path):
    done = serve(tmp_path, 'engine isp = smtp://127.0.0.3:2525 user "me" password env:NO_SUCH_VARIABLE_X\n',
                 env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert "routes.rules:1:" in done.stderr and "NO_SUCH_VARIABLE_X" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_rules_file_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "routedsl", "serve", str(tmp_path / "nope.rules"),
                           "--spool", str(tmp_path / "spool")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot read the rules file" in done.stderr and "Traceback" not in done.stderr


def test_a_bad_flag_value_exits_2(tmp_path):
    done = serve(tmp_path, "engine d = direct\n", "--min-backoff", "soon")
    assert done.returncode == 2
    assert "--min-backoff: 'soon' is not a duration" in done.stderr


async def test_a_spool_in_use_and_a_taken_port_are_refused(tmp_path, make_relay):
    relay = make_relay("engine d = direct\n")
    async with relay:
        second = await asyncio.to_thread(serve, tmp_path, "engine d = direct\n")
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            third = await asyncio.to_thread(
                serve, tmp_path / "rules", "engine d = direct\n", "--listen", f"127.0.0.1:{port}")
    assert second.returncode == 1 and "in use" in second.stderr
    assert third.returncode == 1 and "cannot listen on" in third.stderr
    assert "Traceback" not in second.stderr + third.stderr


async def test_start_up_line_sighup_reload_and_graceful_stop(tmp_path, make_relay):
    async with FakeSmtp("127.0.0.3") as first, FakeSmtp("127.0.0.4") as second:
        relay = make_relay(f"engine first = smtp://127.0.0.3:{first.port} tls none\n")
        async with relay:
            line = await relay.await_log(r"serving on (\S+) spool=(\S+) rules=(\S+) version=(\w+) "
                                         r"engines=1 rules=0 waiting=0")
            assert line.group(1) == f"{relay.address[0]}:{relay.address[1]}"
            # SIGHUP reloads: the new engine order applies to the next message
            relay.rules.write_text(f"engine second = smtp://127.0.0.4:{second.port} tls none\n"
                                   f"engine first = smtp://127.0.0.3:{first.port} tls none\n")
            relay.signal(signal.SIGHUP)
            await relay.await_log(r"rules version \w+ active")
            await send(relay, "a@home.test", ["b@example.net"], message("a@home.test", ["b@example.net"], msgid="<hup@t>"))
            await second.wait_for(1)
            # SIGTERM while a delivery waits for the reply to its final dot: it finishes first
            second.fail("DATA", "delay 1.5")
            await send(relay, "a@home.test", ["b@example.net"], message("a@home.test", ["b@example.net"], msgid="<inflight@t>"))
            await relay.await_log(r"accepted from")
            while second.commands.count("DATA") < 2:
                await asyncio.sleep(0.01)
            code = await relay.astop()
            delivered = [m.header("Message-ID") for m in second.messages]
            # restarted on the same spool: nothing left to deliver again
            await relay.astart()
            await relay.await_log(r"waiting=0")
    assert code == 0
    assert delivered == ["<hup@t>", "<inflight@t>"]
    assert [m.header("Message-ID") for m in second.messages] == delivered   # no duplicate after restart
    assert first.messages == []
    assert "received SIGTERM" in relay.log and "stopped in" in relay.log


def test_refusing_to_start_never_leaves_a_process(tmp_path, make_relay):
    relay = make_relay("engine broken = smtp://\n")
    with pytest.raises(RelayExited) as caught:
        relay.start()
    assert "error[" in str(caught.value)
    assert not relay.running


async def test_the_in_process_relay_delivers_and_stops(tmp_path):
    from tests.support.relay import in_process_relay

    rules = tmp_path / "routes.rules"
    async with FakeSmtp("127.0.0.3") as sink:
        rules.write_text(f"engine sink = smtp://127.0.0.3:{sink.port} tls none\n")
        async with in_process_relay(rules, tmp_path / "spool") as relay:
            addr = relay.addresses[0]
            import aiosmtplib
            await aiosmtplib.send(message("a@home.test", ["b@example.net"], msgid="<inproc@t>"),
                                  sender="a@home.test", recipients=["b@example.net"],
                                  hostname=addr.host, port=addr.port, start_tls=False)
            (got,) = await sink.wait_for(1)
            assert relay.snapshot.table.engines[0].name == "sink"
    assert got.header("Message-ID") == "<inproc@t>"
    assert not any((tmp_path / "spool" / "msg").iterdir())      # delivered and removed


async def test_metrics_count_accepted_mail_and_delivery_attempts(make_relay):
    from tests.support.relay import stable_port

    port = stable_port()
    async with FakeSmtp("127.0.0.3") as sink:
        sink.fail_local("nobody", "550 5.1.1 no such user")
        relay = make_relay(f"engine sink = smtp://127.0.0.3:{sink.port} tls none\n",
                           args=["--metrics", f"127.0.0.1:{port}"])
        async with relay:
            await relay.await_log(rf"metrics=http://127.0.0.1:{port}/metrics")
            rcpts = ["b@example.net", "nobody@example.net"]
            await send(relay, "", rcpts, message("", rcpts, msgid="<metrics@t>"))
            await sink.wait_for(1)
            await relay.await_log("result=delivered")
            page = await http_get("127.0.0.1", port, "/metrics")
            missing = await http_get("127.0.0.1", port, "/other")
    assert page.startswith("HTTP/1.1 200 OK")
    assert "\nroutedsl_messages_accepted_total 1\n" in page
    assert '\nroutedsl_delivery_attempts_total{engine="sink",result="delivered"} 1\n' in page
    assert '\nroutedsl_delivery_attempts_total{engine="sink",result="final"} 1\n' in page
    assert 'routedsl_rules_info{version="' in page
    assert missing.startswith("HTTP/1.1 404")


async def http_get(host: str, port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data.decode()


@pytest.mark.parametrize("processes", ["0", "2"])
async def test_a_client_that_connects_and_leaves_at_once_holds_no_connection_slot(make_relay, processes):
    # what a load balancer's health check or a port scanner does, many times over
    relay = make_relay("engine sink = smtp://127.0.0.3:9 tls none\n",
                       args=["--max-connections-per-ip", "2", "--smtp-processes", processes])
    await relay.astart()
    assert relay.address is not None
    address = relay.address

    def knock() -> None:
        with socket.create_connection(address, timeout=5):
            pass

    def greet() -> str:
        with socket.create_connection(address, timeout=5) as sock:
            first = sock.makefile("rb").readline().decode()
            with socket.create_connection(address, timeout=5) as other:
                return first + other.makefile("rb").readline().decode()

    try:
        for _ in range(6):
            await asyncio.to_thread(knock)
        # both places come free at once (each knock is closed by the relay as soon as it is seen)
        greetings = await until(lambda: (g := greet()).count("220 ") == 2 and g, 10, "two connections welcomed")
        assert greetings.count("220 ") == 2
    finally:
        await relay.astop()
    assert "Traceback" not in relay.log


@pytest.mark.parametrize("processes", ["0", "2"])
def test_a_malformed_users_file_is_refused_with_its_line(tmp_path, processes):
    users = tmp_path / "users"
    users.write_text("alice:$scrypt$ok\nnot a user line\n")
    cert, key = certs.cert_files()
    done = serve(tmp_path, "engine sink = smtp://127.0.0.3:9 tls none\n", "--users", str(users),
                 "--tls-cert", cert, "--tls-key", key, "--smtp-processes", processes)
    assert done.returncode == 1
    assert f"{users}:2: expected 'login:hash'" in done.stderr
    assert "Traceback" not in done.stderr
