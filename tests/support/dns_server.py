"""A small authoritative DNS server over UDP on 127.0.0.1, built with dnspython.

    zones = {
        "ok.test": {"MX": [(10, "mx1.ok.test"), (20, "mx2.ok.test")]},
        "mx1.ok.test": {"A": ["127.0.0.2"]},
        "mx2.ok.test": {"A": ["127.0.0.3"]},
        "alias.test": {"CNAME": "ok.test"},
    }
    async with DnsServer(zones) as dns_server:
        ctx = EngineContext(hostname="relay.test", nameservers=(dns_server.nameserver,))
        dns_server.fail("ok.test", "servfail", times=2)   # then answers normally
        dns_server.null_mx("nomail.test")
        dns_server.queries["ok.test"]                       # queries seen per name

Record types: MX [(pref, host)], A [ip], AAAA [ip], CNAME host, TXT [text]. A name that is
not in `zones` answers NXDOMAIN; a name without the asked type answers NOERROR with no
records. Faults per name: "nxdomain", "servfail", "timeout" (no answer at all), each
optionally for the first `times` queries only. The zones dict may be changed while the
server runs. Answers carry TTL 0 by default so no resolver cache hides a change between
(or within) tests; pass `ttl=` to test caching. Runs in the test's own event loop; stopped on leaving the context.
"""
from __future__ import annotations

import asyncio
import collections
from typing import Any, Optional

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

Zones = dict[str, dict[str, Any]]


def _key(name: str) -> str:
    return name.rstrip(".").lower()


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: "DnsServer") -> None:
        self.server = server
        self.transport: Optional[asyncio.DatagramTransport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server._answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class DnsServer:
    def __init__(self, zones: Optional[Zones] = None, *, ttl: int = 0) -> None:
        self.zones: Zones = {_key(k): v for k, v in (zones or {}).items()}
        self.ttl = ttl
        self.queries: collections.Counter[str] = collections.Counter()
        self.queries_by_type: collections.Counter[tuple[str, str]] = collections.Counter()
        self._faults: dict[str, list[Any]] = {}  # name -> [fault, remaining or None]
        self._transport: Optional[asyncio.DatagramTransport] = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    @property
    def nameserver(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def fail(self, name: str, fault: str, times: Optional[int] = None) -> None:
        """Make `name` fail with "nxdomain", "servfail" or "timeout" (all queries, or the next `times`)."""
        if fault not in ("nxdomain", "servfail", "timeout"):
            raise ValueError(fault)
        self._faults[_key(name)] = [fault, times]

    def heal(self, name: str) -> None:
        self._faults.pop(_key(name), None)

    def null_mx(self, name: str) -> None:
        self.zones.setdefault(_key(name), {})["MX"] = [(0, ".")]

    def add(self, name: str, rtype: str, value: Any) -> None:
        self.zones.setdefault(_key(name), {})[rtype] = value

    async def __aenter__(self) -> "DnsServer":
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=("127.0.0.1", 0))
        self._transport = transport  # type: ignore[assignment]
        self.address = transport.get_extra_info("sockname")[:2]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # --- answering -------------------------------------------------------------------

    def _fault_for(self, name: str) -> Optional[str]:
        entry = self._faults.get(name)
        if entry is None:
            return None
        fault, remaining = entry
        if remaining is not None:
            if remaining <= 0:
                return None
            entry[1] = remaining - 1
        return fault

    def _rrset(self, owner: str, rtype: str, value: Any) -> dns.rrset.RRset:
        if rtype == "MX":
            texts = [f"{pref} {_fqdn(host) if host != '.' else '.'}" for pref, host in value]
        elif rtype == "CNAME":
            texts = [_fqdn(value)]
        elif rtype == "TXT":
            texts = ['"' + t.replace('"', '\\"') + '"' for t in value]
        else:
            texts = list(value)
        return dns.rrset.from_text_list(_fqdn(owner), self.ttl, "IN", rtype, texts)

    def _answer(self, wire: bytes) -> Optional[bytes]:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        question = query.question[0]
        name = _key(question.name.to_text())
        rtype = dns.rdatatype.to_text(question.rdtype)
        self.queries[name] += 1
        self.queries_by_type[(name, rtype)] += 1
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA

        fault = self._fault_for(name)
        if fault == "timeout":
            return None
        if fault == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if fault == "nxdomain":
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()

        owner = name
        for _ in range(8):  # follow CNAME chains inside our zones
            records = self.zones.get(owner)
            if records is None:
                if owner == name:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                break
            if "CNAME" in records and rtype != "CNAME":
                response.answer.append(self._rrset(owner, "CNAME", records["CNAME"]))
                owner = _key(records["CNAME"])
                continue
            if rtype in records and records[rtype]:
                response.answer.append(self._rrset(owner, rtype, records[rtype]))
            break
        return response.to_wire()
