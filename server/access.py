"""Who may relay: clients in the relay networks, or clients that authenticated.

This module owns the relay decision (no open relay, G5). The default networks are
loopback only; `--relay-network` replaces them. Trust is explicit configuration: an
address is never trusted for being "local". It never looks at recipients: a client
that may not relay may not relay to any domain (the relay has no local mailboxes).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
DEFAULT_NETWORKS = ("127.0.0.0/8", "::1/128")
VERDICTS_KEPT = 4096   # client addresses whose answer is kept


class AccessError(ValueError):
    """A relay network that is not a CIDR; the message says which."""


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    nets = []
    for text in cidrs:
        try:
            nets.append(ipaddress.ip_network(str(text).strip(), strict=False))
        except ValueError:
            raise AccessError(f"'{text}' is not a network (expected CIDR, e.g. 192.168.0.0/16)") from None
    return tuple(nets)


def client_address(peer_ip: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """The client's address, IPv4-mapped IPv6 folded to IPv4; None if it is not an IP."""
    try:
        addr = ipaddress.ip_address(str(peer_ip).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True, slots=True)
class RelayAccess:
    """The relay networks; `may_relay` is the one question."""
    networks: tuple[Network, ...] = parse_networks(DEFAULT_NETWORKS)
    # The answer per client address text, kept (parsing the address was ~1 % of the event
    # loop's time with one message per connection); bounded, the networks never change.
    _verdicts: dict[str, bool] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> "RelayAccess":
        nets = parse_networks(cidrs)
        return cls(nets) if nets else cls()

    def trusted(self, peer_ip: str) -> bool:
        verdict = self._verdicts.get(peer_ip)
        if verdict is None:
            addr = client_address(peer_ip)
            verdict = addr is not None and any(addr.version == n.version and addr in n for n in self.networks)
            if len(self._verdicts) >= VERDICTS_KEPT:
                self._verdicts.clear()
            self._verdicts[peer_ip] = verdict
        return verdict

    def may_relay(self, peer_ip: str, authenticated_user: Optional[str]) -> bool:
        return bool(authenticated_user) or self.trusted(peer_ip)

