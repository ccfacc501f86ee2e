"""DATA is read the same whatever way its bytes arrive: the message handed over (or the
refusal) is what reading it line by line gives (only `<CRLF>.<CRLF>` ends it, one dot off
each line that starts with one, a line over the limit is `500 5.5.2`, over the size limit
`552 5.3.4`), whether the whole message is already in the relay's buffer or comes in pieces
that split lines, CRLFs and the final dot anywhere."""
from __future__ import annotations

import asyncio
import random
from typing import Optional

from server import hygiene
from server.limits import Limits
from tests.security.harness import Client, code

LINE_LIMIT = 200          # Limits.max_line_length; the reader allows one more (the dot)
MAX_SIZE = 1200
PIECES = [b"a", b"bc", b".", b"..", b"\r", b"\n", b" ", b"y" * 20]


def line_by_line(body: bytes) -> tuple[Optional[bytes], str]:
    """The reference: (content, "") or (None, the reply's code) for `body` + the final dot."""
    lines, pos, size, too_long = [], 0, 0, False
    while True:
        end = body.index(b"\r\n", pos)
        line = body[pos:end + 2]
        pos = end + 2
        if line == b".\r\n":
            break
        size += len(line)
        too_long = too_long or end - (pos - len(line)) > LINE_LIMIT + 1
        lines.append(line[1:] if line.startswith(b".") else line)
    if too_long:
        return None, "500 5.5.2"
    if size > MAX_SIZE:
        return None, "552 5.3.4"
    return hygiene.normalise_line_ends(b"".join(lines)), ""


def a_body(rng: random.Random) -> bytes:
    """Random lines with dots, bare CRs and LFs, lines near the limit, and sometimes one
    over it; never a final dot before the real one."""
    while True:
        lines = []
        for _ in range(rng.choice([0, 1, 2, 5, 20, 60, 150, 300])):
            line = b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 6)))
            lines.append((b".." if line == b"." else line) + b"\r\n")
        if rng.random() < 0.3:   # a line at the limit (the dot's byte included), just over, far over
            long = rng.choice([b"", b"."]) + b"z" * rng.choice([LINE_LIMIT, LINE_LIMIT + 1, LINE_LIMIT + 2, 900])
            lines.insert(rng.randint(0, len(lines)), long + b"\r\n")
        body = b"".join(lines)
        if b"\r\n.\r\n" not in b"\r\n" + body:
            return body + b".\r\n"


async def send_in_pieces(client: Client, data: bytes, rng: random.Random) -> None:
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 2, 3, 7, 64, 500, len(data)])
        await client.send(data[pos:pos + n])
        pos += n
        if rng.random() < 0.5:
            await asyncio.sleep(0)   # let the relay read a part (not a synchronisation)


async def test_data_read_in_any_pieces_is_the_line_by_line_reading(relays):
    relay = await relays(limits=Limits(max_line_length=LINE_LIMIT, max_errors=10_000), max_size=MAX_SIZE)
    rng = random.Random(20261129)
    client = await Client.connect(relay.port)
    await client.cmd(b"EHLO c.test")
    expected_messages = []
    for _ in range(300):
        body = a_body(rng)
        assert code(await client.cmd(b"MAIL FROM:<a@x.test>")) == "250 2.1.0"
        assert code(await client.cmd(b"RCPT TO:<b@y.test>")) == "250 2.1.5"
        assert code(await client.cmd(b"DATA")) == "354"
        await send_in_pieces(client, body, rng)
        content, refusal = line_by_line(body)
        reply = await client.reply()
        if content is None:
            assert code(reply) == refusal, body
        else:
            assert code(reply) == "250 2.0.0", body
            expected_messages.append(content)
    assert code(await client.cmd(b"NOOP")) == "250"
    await client.close()
    assert [m.data for m in relay.handler.messages] == expected_messages
    assert 150 < len(expected_messages) < 250   # every outcome was tried
    assert relay.state.data_budget.used == 0   # every byte held was given back
