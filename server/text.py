"""One line of safe text from outside: for logs, headers, bounces, queue listings.

This module owns the one cleaning rule for text the relay did not write (a remote
server's reply, a client's login or address, an exception's message) before it is
copied into a log line, a header, a delivery status notification or a queue listing.
Each caller passes the bound that suits where the text goes.

It never raises, never does I/O and never returns more than one line.
"""
from __future__ import annotations

import unicodedata

MAX_TEXT = 400  # characters kept of a remote reply: enough for a diagnosis, bounded for a log line


def clean_text(text: object, limit: int = MAX_TEXT) -> str:
    """Make a text from outside safe to log, store and put in a header.

    Every control or format character (C0, DEL, C1, ESC, bidi marks, line and paragraph
    separators) becomes a space, runs of blanks collapse, and the result is cut at
    `limit` characters. Multi-line replies arrive with lines joined by newlines: they
    become one line. Bytes are read as UTF-8, undecodable bytes replaced.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    out = []
    for ch in str(text):
        if ch.isascii():
            out.append(ch if " " <= ch <= "~" else " ")
        elif unicodedata.category(ch)[0] in ("C", "Z") and ch != "\u00a0":
            # Cc/Cf/Cs/Co/Cn and Zl/Zp/Zs (other than the plain no-break space)
            out.append(" ")
        else:
            out.append(ch)
    cleaned = " ".join("".join(out).split())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3].rstrip() + "..."
    return cleaned
