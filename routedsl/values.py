"""Values of the routes language: sizes, durations, engine URLs, secrets, domains, wildcards.

Owns the parsing and validation of every literal the language accepts. Each parser
returns a plain value or raises ValueError with a message fit to show a user. It never
reads a secret, a file or the network. The relay reuses parse_size and parse_duration
for its command-line flags.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_UNIT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`2000kb` -> 2_000_000. Units b, kb, mb, gb are powers of 1000; kib, mib, gib of 1024."""
    m = _NUMBER_UNIT.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise ValueError(f"'{text}' is not a size; write a number with b, kb, mb, gb, kib, mib or gib (e.g. 2000kb)")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str) -> float:
    """`5m` -> 300.0 seconds. Units s, m, h, d; a bare number is seconds."""
    m = _NUMBER_UNIT.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _DURATION_UNITS:
        raise ValueError(f"'{text}' is not a duration; write a number with s, m, h or d (e.g. 60s, 5m)")
    return float(m.group(1)) * _DURATION_UNITS[unit]


def format_size(n: int) -> str:
    """The shortest exact spelling of a size, for canonical text."""
    for unit, factor in (("gb", 1000**3), ("mb", 1000**2), ("kb", 1000), ("gib", 1024**3), ("mib", 1024**2), ("kib", 1024)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}b"


def parse_int(text: str, what: str, low: int, high: int) -> int:
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{what} must be a whole number from {low} to {high}, not '{text}'")
    return int(text)


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("yes", "true", "on"):
        return True
    if low in ("no", "false", "off"):
        return False
    raise ValueError(f"expected yes or no, not '{text}'")


@dataclass(frozen=True, slots=True)
class EngineUrl:
    kind: str            # "smtp" | "smtps"
    host: str
    port: Optional[int]  # None: the scheme's default


def parse_engine_url(text: str) -> EngineUrl:
    """`smtp://host[:port]` or `smtps://host[:port]`; nothing else in the URL."""
    scheme, sep, _ = text.partition("://")
    if not sep or scheme.lower() not in ("smtp", "smtps"):
        raise ValueError(f"'{text}' is not an engine URL; write smtp://HOST[:PORT], smtps://HOST[:PORT] or direct")
    parts = urlsplit(text)
    if parts.username is not None or parts.password is not None:
        raise ValueError("the URL must not hold a login; use the options user \"LOGIN\" and password env:VAR")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"'{text}': an engine URL is only smtp://HOST[:PORT]")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"'{text}': the port must be a number from 1 to 65535") from None
    host = parts.hostname or ""
    if not host or not re.fullmatch(r"[\w.:-]+", host):
        raise ValueError(f"'{text}': the URL has no valid host name")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"'{text}': the port must be a number from 1 to 65535")
    return EngineUrl(scheme.lower(), host.lower(), port)


_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_secret_ref(text: str) -> tuple[str, str]:
    """`env:VAR` or `file:PATH` -> (kind, value). Checked for form only; never read."""
    kind, sep, rest = text.partition(":")
    kind = kind.lower()
    if sep and kind == "env":
        if not _ENV_VAR.fullmatch(rest):
            raise ValueError(f"'{text}': env: needs a variable name (letters, digits, _)")
        return "env", rest
    if sep and kind == "file":
        if not rest:
            raise ValueError(f"'{text}': file: needs a path")
        return "file", rest
    raise ValueError(f"'{text}' is not a password source; write env:VAR, file:PATH or a quoted string")


# ---------------------------------------------------------------- domains and addresses

def domain_of(address: str) -> str:
    """The domain of an address, normalized (see normalize_domain); '' when there is none."""
    at = address.rfind("@")
    return normalize_domain(address[at + 1:]) if at >= 0 else ""


def normalize_domain(text: str) -> str:
    """Lower-cased, no trailing dot; an internationalized name in its ASCII (A-label) form,
    so a rule written either way matches a recipient written either way."""
    text = text.lower().rstrip(".")
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            pass                      # not a valid IDN: compare it as written
    return text


def normalize_address(text: str) -> str:
    """Addresses compare case-insensitively; `<x>` and `x` are the same address."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    at = text.rfind("@")
    if at >= 0:
        return text[:at].lower() + "@" + normalize_domain(text[at + 1:])
    return text.lower()


def wildcard_regex(pattern: str) -> re.Pattern[str]:
    """`*` matches one or more characters (so `*.aol.com` matches mx.aol.com, not aol.com)."""
    return re.compile(".+".join(re.escape(p) for p in pattern.split("*")), re.IGNORECASE | re.DOTALL)


def suffix_wildcard(pattern: str) -> Optional[str]:
    """For `*.example.com` return 'example.com' (indexable by walking suffixes), else None."""
    if pattern.startswith("*.") and "*" not in pattern[2:] and len(pattern) > 2:
        return pattern[2:]
    return None


def domain_suffixes(domain: str) -> list[str]:
    """'a.b.aol.com' -> ['b.aol.com', 'aol.com', 'com']: what a `*.X` wildcard may name."""
    out = []
    i = domain.find(".")
    while i >= 0:
        out.append(domain[i + 1:])
        i = domain.find(".", i + 1)
    return out
