"""Input hygiene: what a client may put in EHLO, in envelope addresses and in DATA.

This module owns the checks and the cleaning of client input, and the one function that
turns client values into a header (`received_header`). Every function is pure: text or
bytes in, a value or a `Refusal` (an SMTP reply) out. It never does I/O and never raises
on bad input.

The DATA policy, and why:
  * NUL is refused (`550 5.6.0`). RFC 5322 and RFC 2045 forbid it in mail, no honest
    client sends it, and a downstream that strips NUL would read `\\r\\n\\x00.\\r\\n` as
    the end of the data (SMTP smuggling). Stripping would change the message silently.
  * A bare LF or bare CR is normalised to CRLF. Old scripts and some mail libraries do
    send bare LF, so refusing would lose real mail (Postfix 3.9 also normalises by
    default). Only `<CRLF>.<CRLF>` has ended the data (aiosmtpd 1.4.6 reads to CRLF), so
    a bare-LF dot is content; after normalising, it is an ordinary line that the outbound
    client dot-stuffs. The rule is the one aiosmtplib applies on output
    (`\\r\\n|\\n|\\r` -> CRLF), so what is stored is exactly what goes on the wire.
  * More than `hop_limit` Received headers: `554 5.4.6` (a mail loop, RFC 5321 6.3).
  * A header section larger than `max_header_size`: `552 5.3.4`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import formatdate
from typing import Literal, Optional, Union

Role = Literal["sender", "recipient"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """An SMTP reply refusing something: `code enhanced text`."""
    code: int
    enhanced: str
    text: str

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def __str__(self) -> str:
        return self.reply


@dataclass(frozen=True, slots=True)
class Path:
    """A validated envelope path: the address ('' = the null sender) and its parameters."""
    address: str
    params: tuple[str, ...]
    non_ascii: bool = False


# --- EHLO / HELO ---------------------------------------------------------------------

# Controls (C0, DEL, C1) and lone surrogates (bytes that were not UTF-8): one regex scan
# instead of a Python test per character.
_BAD_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_helo(name: Optional[str]) -> Optional[Refusal]:
    """None when `name` is acceptable as an EHLO/HELO argument: one word, no controls, <= 255 octets."""
    if not name:
        return Refusal(501, "5.5.4", "Syntax: EHLO hostname")
    if _BAD_CHAR.search(name) or any(c.isspace() for c in name):
        return Refusal(501, "5.5.2", "Invalid EHLO hostname (control characters or spaces)")
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        return Refusal(501, "5.5.2", "Invalid EHLO hostname (longer than 255 octets)")
    return None


# --- envelope addresses --------------------------------------------------------------

_ATEXT = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
# An ASCII character that is neither atext nor '.' (non-ASCII is allowed: RFC 6531).
_LOCAL_ASCII_BAD = re.compile("[^" + re.escape("".join(sorted(_ATEXT)) + ".") + "\x80-\U0010ffff]")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_LITERAL = re.compile(r"\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]{2,45})\]\Z")
_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(?:=[\x21-\x3C\x3E-\x7E]+)?\Z")


def _codes(role: Role) -> str:
    return "5.1.7" if role == "sender" else "5.1.3"


def _malformed(role: Role, why: str) -> Refusal:
    which = "sender" if role == "sender" else "recipient"
    return Refusal(553, _codes(role), f"Error: malformed {which} address ({why})")


def _valid_local(local: str) -> bool:
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            return False
        body = local[1:-1]
        i = 0
        while i < len(body):
            if body[i] == "\\":
                i += 2
                continue
            if body[i] == '"':
                return False
            i += 1
        return not body.endswith("\\") or body.endswith("\\\\")
    if not local or local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    return _LOCAL_ASCII_BAD.search(local) is None


def _valid_domain(domain: str) -> bool:
    if domain.startswith("["):
        return bool(_LITERAL.match(domain))
    if not domain or len(domain) > 255:
        return False
    for label in domain.split("."):
        if not label.isascii():
            # A U-label (SMTPUTF8): letters of any script, no ASCII punctuation but '-'.
            if not label or len(label) > 63 or label[0] == "-" or label[-1] == "-":
                return False
            if not all(c.isalnum() or c == "-" or ord(c) > 0x7F for c in label):
                return False
        elif not _LABEL.match(label):
            return False
    return True


def _split_mailbox(text: str) -> Optional[tuple[str, str]]:
    """local, domain at the last '@' outside a quoted local part; None without one."""
    if text.startswith('"'):
        i = 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == '"':
                break
            i += 1
        rest = text[i + 1:]
        if not rest.startswith("@"):
            return None
        return text[: i + 1], rest[1:]
    local, at, domain = text.rpartition("@")
    return (local, domain) if at else None


def parse_path(arg: Optional[str], *, role: Role, smtputf8: bool) -> Union[Path, Refusal]:
    """Validate what follows `MAIL FROM:` / `RCPT TO:` (RFC 5321 4.1.2, RFC 6531).

    Angle brackets are required (RFC 5321's grammar has no unbracketed form).
    Controls, DEL, and undecodable bytes: 501. Non-ASCII without SMTPUTF8: 553 5.6.7.
    `<>` is the null sender, refused as a recipient (501 5.1.3). Source routes are
    accepted and ignored, as RFC 5321 4.1.1.3 asks; `%` and `!` are ordinary characters.
    """
    code = _codes(role)
    keyword = "MAIL FROM:<address>" if role == "sender" else "RCPT TO:<address>"
    text = (arg or "").strip(" ")
    if _BAD_CHAR.search(text):
        surrogate = _SURROGATE.search(text) is not None
        why = "not valid UTF-8" if surrogate else "control characters"
        return Refusal(501, code, f"Error: address or parameters contain {why}")
    if not text.startswith("<"):
        return Refusal(501, "5.5.4", f"Syntax: {keyword} (angle brackets required, RFC 5321 4.1.2)")
    close, quoted, i = -1, False, 1
    while i < len(text):
        c = text[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            close = i
            break
        i += 1
    if close < 0:
        return Refusal(501, "5.5.4", f"Syntax: {keyword} (no closing '>')")
    inner, rest = text[1:close], text[close + 1:]
    if rest and not rest.startswith(" "):
        return Refusal(501, "5.5.4", f"Syntax: {keyword} [parameters]")
    params = tuple(rest.split())
    for p in params:
        if not _PARAM.match(p):
            return Refusal(501, "5.5.4", "Syntax error in parameters")
    non_ascii = not inner.isascii()
    if non_ascii and not smtputf8:
        return Refusal(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            return _malformed(role, "bad source route")
        inner = inner[colon + 1:]
    if not inner:
        if role == "sender":
            return Path("", params)
        return Refusal(501, "5.1.3", "Error: the null address is not a recipient")
    split = _split_mailbox(inner)
    if split is None:
        if role == "recipient" and inner.lower() == "postmaster":
            return Refusal(550, "5.1.1", "<postmaster>: this relay has no local mailboxes; "
                                         "write to postmaster@ a domain")
        return _malformed(role, "no domain")
    local, domain = split
    if len(local.encode("utf-8")) > 64 or len(inner.encode("utf-8")) > 254:
        return Refusal(501, code, "Error: address too long (RFC 5321 4.5.3.1)")
    if not _valid_local(local):
        return _malformed(role, "local part")
    if not _valid_domain(domain):
        return _malformed(role, "domain")
    return Path(f"{local}@{domain}", params, non_ascii)


def parse_params(params: tuple[str, ...]) -> dict[str, Union[str, bool]]:
    """`('SIZE=10', 'SMTPUTF8')` -> {'SIZE': '10', 'SMTPUTF8': True} (names upper-cased)."""
    out: dict[str, Union[str, bool]] = {}
    for p in params:
        name, eq, value = p.partition("=")
        out[name.upper()] = value if eq else True
    return out


# --- DATA ----------------------------------------------------------------------------

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_HEADER_LINE = re.compile(rb"[\x21-\x39\x3B-\x7E]+[ \t]*:")
_RECEIVED = re.compile(rb"received[ \t]*:", re.IGNORECASE)


def normalise_line_ends(data: bytes) -> bytes:
    """Every bare CR and bare LF becomes CRLF (the rule aiosmtplib applies on output)."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data   # every CR is in a CRLF and so is every LF: nothing to change (the usual case)
    return _LINE_ENDS.sub(b"\r\n", data)


def header_section(data: bytes) -> bytes:
    """The top-level header lines (CRLF line ends), folded continuations included."""
    pos, n = 0, len(data)
    while pos < n:
        end = data.find(b"\r\n", pos)
        line = data[pos:] if end < 0 else data[pos:end]
        if not line:
            break
        if not (line[:1] in (b" ", b"\t") and pos > 0) and not _HEADER_LINE.match(line):
            break
        pos = n if end < 0 else end + 2
    return data[:pos]


def count_received(data: bytes) -> int:
    """How many `Received:` headers the top-level header section holds."""
    return sum(1 for line in header_section(data).split(b"\r\n") if _RECEIVED.match(line))


def clean_message(data: bytes, *, hop_limit: int = 50, max_header_size: int = 102_400) -> Union[bytes, Refusal]:
    """The DATA policy (see the module docstring): cleaned bytes, or the reply refusing them."""
    if b"\x00" in data:
        return Refusal(550, "5.6.0", "Message contains NUL characters")
    data = normalise_line_ends(data)
    headers = header_section(data)
    if len(headers) > max_header_size:
        return Refusal(552, "5.3.4", "Message header section exceeds fixed maximum size")
    hops = sum(1 for line in headers.split(b"\r\n") if _RECEIVED.match(line))
    if hops > hop_limit:
        return Refusal(554, "5.4.6", "Too many hops (mail loop?)")
    return data


# --- what the relay writes -----------------------------------------------------------

_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_ADDR_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_+=!#$%&'*/?^`{|}~@\[\]:]")


def _token(text: Optional[str], limit: int = 255) -> str:
    cleaned = _TOKEN_UNSAFE.sub("", text or "")[:limit]
    return cleaned or "unknown"


def received_header(*, helo: Optional[str], peer_ip: str, hostname: str, protocol: str = "ESMTP",
                    recipient: Optional[str] = None, queue_id: Optional[str] = None,
                    tls: Optional[str] = None, when: Optional[float] = None) -> bytes:
    """One `Received:` header (RFC 5321 4.4), CRLF-terminated, folded, built only from
    sanitised tokens: nothing the client sent can add a line or a header.

    `recipient` names the recipient when the message has exactly one (Postfix does the same);
    `tls` is e.g. "TLSv1.3"; the authenticated login is never written.
    """
    lines = [f"Received: from {_token(helo)} ([{_token(peer_ip, 45)}])"]
    by = f"\tby {_token(hostname)} (routedsl) with {_token(protocol, 16)}"
    if tls:
        by += f" ({_token(tls, 16)})"
    if queue_id:
        by += f" id {_token(queue_id, 64)}"
    lines.append(by)
    if recipient:
        addr = _ADDR_UNSAFE.sub("", recipient)[:256] or "unknown"
        lines.append(f"\tfor <{addr}>;")
    else:
        lines[-1] += ";"
    lines.append(f"\t{formatdate(when, localtime=False)}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")
