"""ServeConfig: everything `routedsl serve` was told on its command line, as one value.

This module owns the shape of the relay's settings and the parsing of the flag values
that are not sizes or durations (listen addresses, name servers). Sizes and
durations are parsed by the language's own value parsers (`routedsl.values`), so
`--max-size 35mb` means exactly what `max size 35mb` means in a rules file.

It never opens a socket, reads the rules file or touches the spool: it only describes.
Bad values raise `ConfigError` with a message meant for the person who typed the flag.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from server.access import DEFAULT_NETWORKS
from server.limits import Limits


class ConfigError(ValueError):
    """A flag value that cannot be used; the message names the flag and what was expected."""


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on or to reach."""
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServeConfig:
    rules: Path
    listen: Address = Address("127.0.0.1", 2525)
    spool: Path = Path("spool")
    hostname: str = "localhost"
    nameservers: tuple[str, ...] = ()
    relay_networks: tuple[str, ...] = DEFAULT_NETWORKS   # loopback only
    users: Optional[Path] = None
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    listen_tls: Optional[Address] = None
    max_size: int = 35_000_000
    min_backoff: float = 300.0
    max_backoff: float = 3600.0
    queue_lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    metrics: Optional[Address] = None
    ca_file: Optional[Path] = None
    # How long a graceful stop waits for deliveries in flight before closing engines.
    shutdown_timeout: float = 30.0
    # the SMTP server's bounds; None means Limits() with its defaults
    limits: Optional[Limits] = None
    # SMTP intake in this many processes of their own (0: in the relay's own process)
    smtp_processes: int = 0


def parse_address(text: str, flag: str, default_port: int | None = None) -> Address:
    """`HOST:PORT`, `[V6]:PORT`, or a bare host when a default port exists."""
    text = text.strip()
    host, port_text = text, None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"{flag}: '{text}' has '[' without ']'")
        host, rest = text[1:close], text[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"{flag}: expected [ADDRESS]:PORT, got '{text}'")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ConfigError(f"{flag}: '{text}' has no host (expected HOST:PORT, e.g. 127.0.0.1:2525)")
    if port_text is None:
        if default_port is None:
            raise ConfigError(f"{flag}: '{text}' has no port (expected HOST:PORT, e.g. 127.0.0.1:2525)")
        return Address(host, default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{flag}: '{port_text}' is not a port number (0-65535)")
    return Address(host, int(port_text))


def parse_nameserver(text: str) -> str:
    """`IP` or `IP:PORT` (IPv6 as `[IP]:PORT`); returned in the form EngineContext takes."""
    addr = parse_address(text, "--nameserver", default_port=53)
    try:
        ipaddress.ip_address(addr.host)
    except ValueError:
        raise ConfigError(f"--nameserver: '{addr.host}' is not an IP address") from None
    if addr.port == 53 and not text.rstrip().endswith(":53"):
        return addr.host
    return str(addr)


def parse_size_flag(text: str, flag: str) -> int:
    from routedsl.values import parse_size
    try:
        return parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def parse_duration_flag(text: str, flag: str) -> float:
    from routedsl.values import parse_duration
    try:
        return float(parse_duration(text))
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
