"""What goes over the wire in one SMTP transaction, below the dialogue's decisions.

Owns: the MAIL and RCPT command lines (checked as aiosmtplib checks them), the DATA
payload (line ends, dot-stuffing, the final dot), and `Replies`, which reads the replies
to a pipelined group of commands (RFC 2920).

Never decides what a reply means (server.engines.base, server.outcome), never opens or
closes a connection.
"""
from __future__ import annotations

import asyncio
import collections
import functools
from typing import Optional, Sequence

import aiosmtplib
import aiosmtplib.protocol as _protocol
from aiosmtplib.email import quote_address


@functools.lru_cache(maxsize=512)
def _quoted(address: str) -> str:
    """aiosmtplib's quote_address, remembered: its email.utils.parseaddr was ~3 % of the
    event loop's time, and the same senders and recipients come again and again. A pure
    function of the text; an address it refuses raises every time (errors are not kept)."""
    return quote_address(address)


def command(verb: bytes, prefix: bytes, address: str, encoding: str,
            options: Sequence[str]) -> bytes:
    """One MAIL or RCPT line, checked as aiosmtplib checks it (ValueError, UnicodeError)."""
    args = [prefix + _quoted(address).encode(encoding)]
    args.extend(option.encode("ascii") for option in options)
    for arg in args:
        if _protocol.COMMAND_INJECTION_REGEX.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return verb + b" " + b" ".join(args) + b"\r\n"


def payload(data: bytes) -> bytes:
    """The DATA body as sent: CRLF line ends, leading dots doubled, then the final dot.

    The same preparation as aiosmtplib's own data(), but each regular expression runs only
    when the message needs it: most arrive with CRLF line ends and no line starting with '.'.
    """
    crlf = data.count(b"\r\n")
    if not (data.count(b"\r") == crlf == data.count(b"\n") and data.endswith(b"\r\n")):
        data = _protocol.normalize_message_line_endings(data)
    if data.startswith(b".") or b"\n." in data:
        data = _protocol.PERIOD_REGEX.sub(b"..", data)
    return data + b".\r\n"


class Replies(asyncio.Protocol):
    """Reads the replies to a pipelined group of commands.

    Installed on the transport in place of aiosmtplib's protocol for the length of one
    group: that protocol expects one reply per command written and drops bytes that arrive
    while no command waits, so it cannot read replies that come together. Connection loss
    and flow control are passed on to it, so the client's own state stays right.
    """

    def __init__(self, inner: _protocol.SMTPProtocol, expected: int) -> None:
        self._inner = inner
        self._expected = expected  # replies beyond this are not ours: dropped, noted
        self._taken = 0
        self._extra = False
        self._buffer = bytearray()
        self._replies: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()
        self._ended: Optional[BaseException] = None
        self._waiter: Optional[asyncio.Future[None]] = None

    def data_received(self, data: bytes) -> None:
        if self._ended is not None:
            return
        self._buffer.extend(data)
        try:
            while (reply := parse_reply(self._buffer)) is not None:
                if self._taken >= self._expected:
                    self._extra = True  # a server out of step; bounded memory all the same
                    continue
                self._taken += 1
                self._replies.append(reply)
            if len(self._buffer) > _protocol.MAX_RESPONSE_LENGTH:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        except aiosmtplib.SMTPResponseException as exc:
            self._end(exc)
        self._wake()

    def eof_received(self) -> bool:
        self._end(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._end(aiosmtplib.SMTPServerDisconnected("Connection lost"))
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def unread(self) -> bool:
        return bool(self._replies or self._buffer or self._extra)

    def _end(self, exc: BaseException) -> None:
        if self._ended is None:
            self._ended = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout: Optional[float]) -> aiosmtplib.SMTPResponse:
        """The next reply; SMTPResponseException (code -1) for a garbled one,
        SMTPServerDisconnected when the connection ended, SMTPReadTimeoutError."""
        if not self._replies and self._ended is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            except (TimeoutError, asyncio.TimeoutError):
                raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from None
            finally:
                self._waiter = None
        if self._replies:
            return self._replies.popleft()
        assert self._ended is not None
        raise self._ended


def parse_reply(buffer: bytearray) -> Optional[aiosmtplib.SMTPResponse]:
    """Take one complete reply off the front of `buffer` (None if it has none yet);
    SMTPResponseException with code -1 for a line that is not a reply (as aiosmtplib)."""
    code = -1
    message = bytearray()
    offset = 0
    while True:
        end = buffer.find(b"\n", offset)
        if end == -1:
            return None
        line = bytes(buffer[offset:end + 1])
        if len(line) > _protocol.MAX_LINE_LENGTH:
            raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        try:
            code = int(line[:3])
        except ValueError:
            raise aiosmtplib.SMTPResponseException(
                -1, f"Malformed SMTP response line: {line.decode('utf-8', errors='ignore')}") from None
        offset += len(line)
        if message:
            message.extend(b"\n")
        message.extend(line[4:].strip(b" \t\r\n"))
        if line[3:4] != b"-":
            del buffer[:offset]
            return aiosmtplib.SMTPResponse(code, bytes(message).decode("utf-8", "surrogateescape"))
