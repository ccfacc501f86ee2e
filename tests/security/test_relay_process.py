"""End to end against `routedsl serve` as a real process: the limit, TLS and users flags reach
the protocol; a bounded connection flood and a slowloris client leave the relay serving others;
AUTH over the implicit-TLS listener lets an outside client relay."""
from __future__ import annotations

import asyncio
import base64

import pytest

from server.users import hash_password
from tests.security.harness import Client, code, until
from tests.security.lenient import LenientServer

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n.\r\n"


@pytest.fixture
async def downstream():
    server = await LenientServer().start()
    yield server
    await server.stop()


@pytest.fixture
async def relay_process(tmp_path, downstream):
    routedsl = pytest.importorskip("routedsl")
    if not hasattr(routedsl, "compile_text"):
        pytest.skip("the routes language is not built yet")
    from tests.support.relay import RelayProcess
    rules = tmp_path / "routes.rules"
    rules.write_text(f"engine down = smtp://127.0.0.1:{downstream.port} tls none\n")
    started = []

    def make(*args: str) -> RelayProcess:
        relay = RelayProcess(rules, tmp_path / "spool", args=args)
        started.append(relay)
        return relay
    yield make
    for relay in started:
        await relay.astop()   # in a thread: the downstream on this loop must keep answering


def login_flags(tmp_path, ca) -> list[str]:
    """serve flags for a relay that trusts no loopback client, has a certificate from the
    test CA and knows alice (password 'right horse'): only a login lets a client relay."""
    cert = tmp_path / "relay.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('right horse')}\n")
    return ["--relay-network", "192.0.2.0/24", "--users", str(users),
            "--tls-cert", str(cert), "--tls-key", str(cert)]


async def relayed(client: Client, downstream) -> None:
    """After MAIL: b@y.test is accepted, the message queued, and it reaches the next hop."""
    assert code(await client.cmd(b"RCPT TO:<b@y.test>")) == "250 2.1.5"
    await client.cmd(b"DATA")
    await client.send(MESSAGE)
    assert code(await client.reply()) == "250 2.0.0"
    await client.close()
    await until(lambda: len(downstream.messages) == 1, timeout=30, what="the message at the next hop")


async def send_message(port: int, src: str = "127.0.0.1") -> str:
    client = await Client.connect(port, src=src)
    try:
        if code(client.banner) != "220":
            return code(client.banner)
        await client.cmd(b"EHLO c.test")
        await client.cmd(b"MAIL FROM:<a@x.test>")
        await client.cmd(b"RCPT TO:<b@y.test>")
        await client.cmd(b"DATA")
        await client.send(MESSAGE)
        return code(await client.reply())
    finally:
        await client.close()


async def test_connection_flood_from_one_address_leaves_the_relay_serving_others(relay_process):
    relay = await relay_process("--max-connections", "30", "--max-connections-per-ip", "10").astart()
    port = relay.address[1]
    flood = [await Client.connect(port, src="127.0.0.40", read_banner=False) for _ in range(25)]
    try:
        banners = [code(await c.reply()) for c in flood]
        assert banners.count("220") == 10 and banners.count("421 4.7.0") == 15
        assert await send_message(port, src="127.0.0.41") == "250 2.0.0"
    finally:
        for c in flood:
            await c.close()
    # Once the flood is gone, its address is served again.
    result = ""
    for _ in range(200):
        result = await send_message(port, src="127.0.0.40")
        if result == "250 2.0.0":
            break
        await asyncio.sleep(0.02)
    assert result == "250 2.0.0"
    assert "Traceback" not in relay.log


async def test_global_connection_cap(relay_process):
    relay = await relay_process("--max-connections", "12", "--max-connections-per-ip", "4").astart()
    port = relay.address[1]
    held = [await Client.connect(port, src=f"127.0.0.{60 + i // 4}") for i in range(12)]
    try:
        extra = await Client.connect(port, src="127.0.0.70", read_banner=False)
        assert code(await extra.reply()) == "421 4.3.2"
        await extra.close()
        assert code(await held[0].cmd(b"NOOP")) == "250"     # existing sessions unaffected
    finally:
        for c in held:
            await c.close()


async def test_slowloris_is_cut_and_others_are_served(relay_process):
    relay = await relay_process("--idle-timeout", "1s", "--min-data-rate", "2000").astart()
    port = relay.address[1]
    slow_command = await Client.connect(port, src="127.0.0.80")
    slow_data = await Client.connect(port, src="127.0.0.81")
    await slow_data.cmd(b"EHLO slow.test")
    await slow_data.cmd(b"MAIL FROM:<a@x.test>")
    await slow_data.cmd(b"RCPT TO:<b@y.test>")
    assert code(await slow_data.cmd(b"DATA")) == "354"

    async def drip(client: Client, pieces: list[bytes]) -> bytes:
        for piece in pieces:
            try:
                await client.send(piece)
            except ConnectionError:
                break
            try:
                return await client.reply(timeout=0.15)
            except asyncio.TimeoutError:
                continue
        return b"<still open>"

    command_drip = asyncio.create_task(drip(slow_command, [bytes([b]) for b in b"EHLO " * 40]))
    data_drip = asyncio.create_task(drip(slow_data, [b"line %d\r\n" % i for i in range(60)]))
    try:
        # While both drip, others are served promptly.
        for _ in range(3):
            assert await send_message(port) == "250 2.0.0"
        assert code(await command_drip) == "421 4.4.2"
        assert code(await data_drip) == "421 4.4.2"
        assert "Traceback" not in relay.log
    finally:
        command_drip.cancel(), data_drip.cancel()
        await slow_command.close()
        await slow_data.close()


async def test_auth_over_implicit_tls_through_the_real_relay(relay_process, tmp_path, ca, client_tls, downstream):
    relay = await relay_process(*login_flags(tmp_path, ca), "--listen-tls", "127.0.0.1:0").astart()
    plain = await Client.connect(relay.address[1])
    reply = await plain.cmd(b"EHLO c.test")
    assert b"STARTTLS" in reply and b"AUTH" not in reply
    await plain.cmd(b"MAIL FROM:<a@x.test>")
    assert code(await plain.cmd(b"RCPT TO:<b@y.test>")) == "554 5.7.1"   # loopback not trusted here
    await plain.close()
    tls_port = int(relay.wait_for_log(r"serving on \S+ \S+?:(\d+)").group(1))   # the second address
    client = await Client.connect(tls_port, tls=client_tls)
    assert b"AUTH LOGIN PLAIN" in await client.cmd(b"EHLO c.test")
    assert code(await client.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0right horse"))) == "235 2.7.0"
    await client.cmd(b"MAIL FROM:<a@x.test>")
    await relayed(client, downstream)
    assert "right horse" not in relay.log and base64.b64encode(b"\0alice\0right horse").decode() not in relay.log


async def test_queue_limit_reaches_the_real_relay(tmp_path):
    from tests.support.fake_smtp import unused_port
    from tests.support.relay import RelayProcess
    rules = tmp_path / "routes.rules"
    rules.write_text(f"engine nowhere = smtp://127.0.0.1:{unused_port()} tls none\n")   # mail waits
    relay = RelayProcess(rules, tmp_path / "spool", args=["--max-queue-messages", "1"])
    try:
        await relay.astart()
        assert await send_message(relay.address[1]) == "250 2.0.0"
        client = await Client.connect(relay.address[1])
        await client.cmd(b"EHLO c.test")
        assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "452 4.3.1"
        await client.close()
    finally:
        await relay.astop()


async def test_starttls_and_auth_through_the_real_relay(relay_process, tmp_path, ca, client_tls, downstream):
    relay = await relay_process(*login_flags(tmp_path, ca)).astart()
    client = await Client.connect(relay.address[1])
    await client.cmd(b"EHLO c.test")
    await client.send(b"STARTTLS\r\nMAIL FROM:<inj@x.test>\r\n")     # the injected command must vanish
    assert code(await client.reply()) == "220"
    await client.starttls(client_tls)
    assert b"AUTH LOGIN PLAIN" in await client.cmd(b"EHLO c.test")
    assert code(await client.cmd(b"STARTTLS")) == "554 5.5.1"
    assert code(await client.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong"))) == "535 5.7.8"
    assert code(await client.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0right horse"))) == "235 2.7.0"
    assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "250 2.1.0"
    await relayed(client, downstream)
    assert downstream.messages[0].sender.split()[0] == "<a@x.test>"
    assert "Traceback" not in relay.log
