"""Every bound has a test: recipients, commands, junk commands, line length, message and
header size, idle time, the session deadline, the minimum data rate, connections in all and
per client IP, the disk reserve, hop count; and internal errors answer 451, not 500."""
from __future__ import annotations

import asyncio
import errno

from server.limits import Limits
from tests.security.harness import Client, RecordingHandler, code, until

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n.\r\n"


async def ready(relay, src="127.0.0.1") -> Client:
    client = await Client.connect(relay.port, src=src)
    await client.cmd(b"EHLO c.test")
    return client


async def in_data(relay) -> Client:
    """A session past DATA for one message from a@x.test to b@y.test."""
    client = await ready(relay)
    await client.cmd(b"MAIL FROM:<a@x.test>")
    await client.cmd(b"RCPT TO:<b@y.test>")
    await client.cmd(b"DATA")
    return client


async def test_recipients_over_the_limit_get_452_and_the_rest_is_delivered(relays):
    relay = await relays(limits=Limits(max_recipients=3))
    client = await ready(relay)
    await client.cmd(b"MAIL FROM:<a@x.test>")
    replies = [code(await client.cmd(b"RCPT TO:<r%d@y.test>" % i)) for i in range(5)]
    assert replies == ["250 2.1.5"] * 3 + ["452 4.5.3"] * 2
    await client.cmd(b"DATA")
    await client.send(MESSAGE)
    assert code(await client.reply()) == "250 2.0.0"
    assert relay.handler.messages[0].recipients == ["r0@y.test", "r1@y.test", "r2@y.test"]
    await client.close()


async def test_at_least_a_hundred_recipients_by_default(relays):
    relay = await relays()
    client = await ready(relay)
    await client.cmd(b"MAIL FROM:<a@x.test>")
    await client.send(b"".join(b"RCPT TO:<r%d@y.test>\r\n" % i for i in range(100)))   # pipelined
    replies = b""
    while replies.count(b"\r\n") < 100:
        replies += await client.reply()
    assert replies.count(b"250 2.1.5") == 100
    await client.close()


async def test_junk_commands_are_limited(relays):
    relay = await relays(limits=Limits(max_junk_commands=5))
    client = await ready(relay)
    for _ in range(5):
        assert code(await client.cmd(b"NOOP")) == "250"
    assert code(await client.cmd(b"RSET")) == "421 4.7.0"
    assert await client.closed()


async def test_commands_per_session_are_limited(relays):
    relay = await relays(limits=Limits(max_commands=4))
    client = await ready(relay)                                      # 1
    await client.cmd(b"MAIL FROM:<a@x.test>")                       # 2
    await client.cmd(b"RCPT TO:<b@y.test>")                          # 3
    assert code(await client.cmd(b"RCPT TO:<c@y.test>")) == "250 2.1.5"   # 4
    assert code(await client.cmd(b"RCPT TO:<d@y.test>")) == "421 4.7.0"
    assert await client.closed()


async def test_unknown_commands_are_limited(relays):
    relay = await relays()
    client = await ready(relay)
    replies = [code(await client.cmd(b"XYZZY")) for _ in range(5)]
    assert replies[:4] == ["500"] * 4 and replies[4] == "502 5.5.1"
    assert await client.closed()


async def test_long_command_and_data_lines(relays):
    relay = await relays(limits=Limits(max_line_length=200))
    client = await ready(relay)
    assert code(await client.cmd(b"NOOP " + b"x" * 600)) == "500"
    assert code(await client.cmd(b"NOOP " + b"x" * 5000)) == "500"
    assert code(await client.cmd(b"NOOP")) == "250"
    await client.cmd(b"MAIL FROM:<a@x.test>")
    await client.cmd(b"RCPT TO:<b@y.test>")
    await client.cmd(b"DATA")
    await client.send(b"Subject: long\r\n\r\n" + b"y" * 2000 + b"\r\nmore\r\n.\r\n")
    assert code(await client.reply()) == "500 5.5.2"
    assert code(await client.cmd(b"NOOP")) == "250"
    await client.close()
    assert relay.handler.messages == []


async def test_message_over_the_size_limit_is_drained_then_refused(relays):
    relay = await relays(max_size=1000)
    client = await in_data(relay)
    # Over the limit, then a bogus end of data and a command: only the real dot ends DATA.
    await client.send(b"Subject: big\r\n\r\n" + b"z" * 70 + b"\r\n" * 20 + b"\n.\nHELP\r\n" + b"w\r\n" * 300)
    await client.send(b".\r\n")
    assert code(await client.reply()) == "552 5.3.4"
    assert code(await client.cmd(b"NOOP")) == "250"
    await client.close()
    assert relay.handler.messages == []


async def test_header_section_over_the_limit_is_refused(relays):
    relay = await relays(limits=Limits(max_header_size=2000))
    client = await in_data(relay)
    await client.send(b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(50)) + b"\r\nbody\r\n.\r\n")
    assert code(await client.reply()) == "552 5.3.4"
    await client.close()
    assert relay.handler.messages == []


async def test_too_many_hops_is_refused_with_554_5_4_6(relays):
    relay = await relays(limits=Limits(hop_limit=5))
    client = await ready(relay)
    for hops, expected in ((5, "250 2.0.0"), (6, "554 5.4.6")):
        await client.cmd(b"MAIL FROM:<a@x.test>")
        await client.cmd(b"RCPT TO:<b@y.test>")
        await client.cmd(b"DATA")
        headers = b"".join(b"Received: from h%d\r\n\tby relay; Sun, 1 Nov 2026\r\n" % i for i in range(hops))
        await client.send(headers + b"Subject: loop\r\n\r\nbody\r\n.\r\n")
        assert code(await client.reply()) == expected
    await client.close()
    assert len(relay.handler.messages) == 1


async def test_idle_client_is_disconnected(relays):
    relay = await relays(limits=Limits(idle_timeout=0.5))
    client = await Client.connect(relay.port)
    assert code(await client.reply()) == "421 4.4.2"
    assert await client.closed()


async def test_session_deadline_ends_a_busy_session(relays):
    """A client that keeps the session alive with valid commands is still cut at the deadline."""
    relay = await relays(limits=Limits(session_timeout=1.0, idle_timeout=30))
    client = await ready(relay)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    last = b""
    while loop.time() < deadline:
        last = await client.cmd(b"HELP")
        if code(last).startswith("421"):
            break
        await asyncio.sleep(0.1)
    assert code(last) == "421 4.4.2"
    assert await client.closed()


async def test_slow_data_below_the_minimum_rate_is_cut(relays):
    relay = await relays(limits=Limits(idle_timeout=1.0, min_data_rate=1000))
    client = await in_data(relay)
    # A short line every 0.2 s: never idle for a second, but far below 1000 bytes/s.
    reply = b""
    for _ in range(50):
        try:
            await client.send(b"slow line\r\n")
        except ConnectionError:
            break
        try:
            reply = await client.reply(timeout=0.2)
            break
        except asyncio.TimeoutError:
            continue
    assert code(reply) == "421 4.4.2"
    assert await client.closed()
    assert relay.handler.messages == []


async def test_fast_data_longer_than_the_idle_timeout_is_not_cut(relays):
    relay = await relays(limits=Limits(idle_timeout=2.0, min_data_rate=100))
    client = await in_data(relay)
    await client.send(b"Subject: steady\r\n\r\n")
    for _ in range(14):   # 2.8 s in all, each 0.2 s a 100-byte line: above the minimum rate
        await client.send(b"d" * 98 + b"\r\n")
        await asyncio.sleep(0.2)
    await client.send(b".\r\n")
    assert code(await client.reply()) == "250 2.0.0"
    await client.close()


async def test_connections_per_ip_and_in_all(relays):
    relay = await relays(limits=Limits(max_connections=4, max_connections_per_ip=2))
    a1, a2 = [await Client.connect(relay.port, src="127.0.0.30") for _ in range(2)]
    a3 = await Client.connect(relay.port, src="127.0.0.30", read_banner=False)
    assert code(await a3.reply()) == "421 4.7.0"
    assert await a3.closed()
    b1, b2 = [await Client.connect(relay.port, src="127.0.0.31") for _ in range(2)]
    c1 = await Client.connect(relay.port, src="127.0.0.32", read_banner=False)
    assert code(await c1.reply()) == "421 4.3.2"
    # Existing sessions are unaffected, and a freed slot is usable again.
    assert code(await a1.cmd(b"NOOP")) == "250"
    await a2.cmd(b"QUIT")
    await a2.close()
    banner = b""
    for _ in range(100):
        c2 = await Client.connect(relay.port, src="127.0.0.32", read_banner=False)
        banner = await c2.reply()
        await c2.close()
        if code(banner) == "220":
            break
        await asyncio.sleep(0.02)
    assert code(banner) == "220"
    for c in (a1, b1, b2, c1, a3):
        await c.close()


async def test_low_disk_space_at_mail_gets_452_4_3_1(relays):
    free = {"bytes": 10**12}
    relay = await relays(max_size=1_000_000, free_space=lambda: free["bytes"])
    client = await ready(relay)
    assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "250 2.1.0"
    await client.cmd(b"RSET")
    free["bytes"] = 1_400_000   # below 1.5 x the size limit
    assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "452 4.3.1"
    free["bytes"] = 10**12
    assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "250 2.1.0"
    await client.close()


async def test_internal_errors_answer_451_without_details(relays):
    handler = RecordingHandler(fail=RuntimeError("secret /var/spool/path detail"))
    relay = await relays(handler)
    client = await in_data(relay)
    await client.send(MESSAGE)
    reply = await client.reply()
    assert code(reply) == "451 4.3.0" and b"secret" not in reply and b"RuntimeError" not in reply
    handler.fail = OSError(errno.ENOSPC, "No space left on device", "/var/spool/tmp/x")
    await client.cmd(b"MAIL FROM:<a@x.test>")
    await client.cmd(b"RCPT TO:<b@y.test>")
    await client.cmd(b"DATA")
    await client.send(MESSAGE)
    reply = await client.reply()
    assert code(reply) == "452 4.3.1" and b"/var/spool" not in reply
    assert code(await client.cmd(b"NOOP")) == "250"
    await client.close()


async def test_error_replies_are_limited_per_session(relays):
    relay = await relays(limits=Limits(max_errors=5), relay_networks=("192.0.2.0/24",))
    client = await ready(relay)
    await client.cmd(b"MAIL FROM:<a@x.test>")
    replies = [code(await client.cmd(b"RCPT TO:<probe%d@y.test>" % i)) for i in range(4)]
    assert replies == ["554 5.7.1"] * 4
    assert await last_error_then_421(client, b"RCPT TO:<probe@y.test>") == "554 5.7.1"


async def last_error_then_421(client: Client, line: bytes) -> str:
    """Send `line`; its reply must be followed by 421 4.7.0 and the close. Returns the first reply's code."""
    reply = await client.cmd(line)
    first = reply.split(b"\r\n")[0]
    if b"\r\n421 " not in reply:
        reply = await client.reply()
    assert code(reply) == "421 4.7.0"
    assert await client.closed()
    return code(first + b"\r\n")


async def test_recipient_overshoot_is_tolerated_then_counted_as_errors(relays):
    relay = await relays(limits=Limits(max_recipients=2, max_errors=3))
    client = await ready(relay)
    await client.cmd(b"MAIL FROM:<a@x.test>")
    replies = [code(await client.cmd(b"RCPT TO:<r%d@y.test>" % i)) for i in range(6)]
    assert replies == ["250 2.1.5"] * 2 + ["452 4.5.3"] * 4   # 2 tolerated, 2 errors so far
    await client.cmd(b"DATA")
    await client.send(MESSAGE)
    assert code(await client.reply()) == "250 2.0.0"          # the accepted ones are delivered
    await client.cmd(b"MAIL FROM:<a@x.test>")
    assert code(await client.cmd(b"RCPT TO:<q@y.test>")) == "250 2.1.5"
    assert code(await client.cmd(b"RCPT TO:<q2@y.test>")) == "250 2.1.5"
    assert await last_error_then_421(client, b"RCPT TO:<q3@y.test>") == "452 4.5.3"


async def test_a_stream_of_recipients_is_cut_off(relays):
    """Exim CVE-2020-28017 style: RCPTs streamed without reading replies end in a closed connection."""
    relay = await relays(limits=Limits(max_recipients=10))
    client = await ready(relay)
    await client.cmd(b"MAIL FROM:<a@x.test>")
    try:
        await client.send(b"".join(b"RCPT TO:<r%d@y.test>\r\n" % i for i in range(5000)))
    except ConnectionError:
        pass
    assert await client.closed()
    assert relay.handler.messages == []


async def test_message_data_in_memory_is_bounded_across_sessions(relays):
    relay = await relays(max_size=50_000, limits=Limits(max_data_memory=1))   # budget: one message
    budget = relay.state.data_budget
    chunk = b"Subject: big\r\n\r\n" + b"".join(b"%s\r\n" % (b"m" * 98) for _ in range(300))   # ~30 KB
    a, b = await ready(relay, src="127.0.0.90"), await ready(relay, src="127.0.0.91")
    for c in (a, b):
        await c.cmd(b"MAIL FROM:<a@x.test>")
        await c.cmd(b"RCPT TO:<b@y.test>")
        assert code(await c.cmd(b"DATA")) == "354"
    await a.send(chunk)
    await until(lambda: budget.used >= len(chunk) - 100, what="the first message in memory")
    await b.send(chunk + b".\r\n")
    assert code(await b.reply()) == "451 4.3.2"      # temporary: the client tries again
    await a.send(b".\r\n")
    assert code(await a.reply()) == "250 2.0.0"
    assert budget.used == 0
    await b.cmd(b"MAIL FROM:<a@x.test>")
    await b.cmd(b"RCPT TO:<b@y.test>")
    await b.cmd(b"DATA")
    await b.send(chunk + b".\r\n")
    assert code(await b.reply()) == "250 2.0.0"
    await a.close(), await b.close()
    assert len(relay.handler.messages) == 2 and budget.used == 0


async def test_full_queue_at_mail_gets_452_4_3_1(relays):
    usage = {"now": (0, 0)}
    relay = await relays(limits=Limits(max_queue_messages=10, max_queue_size=1_000_000),
                         queue_usage=lambda: usage["now"])
    client = await ready(relay)
    assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "250 2.1.0"
    await client.cmd(b"RSET")
    usage["now"] = (10, 5000)
    assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "452 4.3.1"
    usage["now"] = (3, 999_000)
    assert code(await client.cmd(b"MAIL FROM:<a@x.test> SIZE=2000")) == "452 4.3.1"
    assert code(await client.cmd(b"MAIL FROM:<a@x.test> SIZE=500")) == "250 2.1.0"
    await client.close()
