"""A deliberately lenient downstream SMTP server for smuggling tests.

It does what the vulnerable servers of the SMTP smuggling reports did: it accepts bare LF
and bare CR as line ends, strips NUL, and ends DATA at any `<EOL>.<EOL>` with EOL one of
CRLF, LF, CR. Whatever follows in the same stream is read as new commands. It counts the
messages it ends this way and the envelopes they had, so a test sees at once whether what
the relay sent could be split into more than one message.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Optional

_EOL = re.compile(rb"\r\n|\n|\r")
_END = re.compile(rb"(?:\r\n|\n|\r)\.(?:\r\n|\n|\r)")


@dataclass
class LenientMessage:
    sender: str
    recipients: list[str]
    data: bytes


@dataclass
class LenientServer:
    host: str = "127.0.0.1"
    messages: list[LenientMessage] = field(default_factory=list)
    wire: list[bytes] = field(default_factory=list)   # every byte received, as it came off the wire
    server: Optional[asyncio.Server] = None

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def start(self) -> "LenientServer":
        self.server = await asyncio.start_server(self._session, self.host, 0)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        sender, recipients, in_data = "", [], False
        data_start = 0

        def say(text: bytes) -> None:
            writer.write(text + b"\r\n")
        say(b"220 lenient.test ESMTP")
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), 60)
                if not chunk:
                    break
                self.wire.append(chunk)
                buf += chunk
                while True:
                    if in_data:
                        stripped = buf.replace(b"\x00", b"")
                        # The data starts after the DATA line; an end marker may use its EOL.
                        match = _END.search(stripped, max(0, data_start - 1))
                        if not match:
                            break
                        payload = stripped[data_start:match.start()]
                        self.messages.append(LenientMessage(sender, recipients, payload))
                        buf = stripped[match.end():]
                        sender, recipients, in_data = "", [], False
                        say(b"250 2.0.0 counted")
                        continue
                    match = _EOL.search(buf)
                    if not match:
                        break
                    line, buf = buf[:match.start()], buf[match.end():]
                    verb = line[:4].upper()
                    if verb in (b"EHLO", b"HELO"):
                        say(b"250-lenient.test\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 100000000")
                    elif verb == b"MAIL":
                        sender = line.partition(b":")[2].decode("latin-1").strip()
                        say(b"250 ok")
                    elif verb == b"RCPT":
                        recipients.append(line.partition(b":")[2].decode("latin-1").strip())
                        say(b"250 ok")
                    elif verb == b"DATA":
                        in_data, data_start = True, 0
                        buf = b"\r\n" + buf   # the DATA line's own end may start the marker
                        data_start = 2
                        say(b"354 go")
                    elif verb == b"QUIT":
                        say(b"221 bye")
                        await writer.drain()
                        return
                    else:
                        say(b"250 ok")
                await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
