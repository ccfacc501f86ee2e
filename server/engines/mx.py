"""MX resolution for the direct engine and for `mx` rules (dnspython's async resolver).

Owns: the MX lookup of a domain, preference order (random among equal preferences),
null MX (RFC 7505), the implicit MX (the domain's own A/AAAA records when it has no MX),
the addresses of every MX host, and turning DNS failures into Outcome values via
server.outcome (NXDOMAIN permanent and final, SERVFAIL/timeout temporary).

One resolver (with a TTL-respecting cache) per EngineContext. Never opens an SMTP
connection and never raises out of `resolve()` or `mx_names()`.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Optional

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from server import outcome as oc
from server.config import parse_address
from server.engines.base import EngineContext
from server.outcome import Outcome, Stage

log = logging.getLogger("routedsl.engines.mx")

_resolvers: dict[EngineContext, dns.asyncresolver.Resolver] = {}


@dataclass(frozen=True, slots=True)
class MxHost:
    name: str                      # lower case, no trailing dot
    preference: int
    addresses: tuple[str, ...]     # IPv4 first, then IPv6


@dataclass(frozen=True, slots=True)
class MxResult:
    """Either the hosts to try, in order, or the Outcome that ends the attempt."""
    domain: str
    hosts: tuple[MxHost, ...] = ()
    outcome: Optional[Outcome] = None
    implicit: bool = False         # no MX: the domain itself is the mail host


def _nameserver(spec: str) -> dns.nameserver.Do53Nameserver:
    """A server of EngineContext.nameservers ("IP", "IP:PORT", "[V6]:PORT")."""
    address = parse_address(spec, "nameserver", default_port=53)
    return dns.nameserver.Do53Nameserver(address.host, address.port)


def resolver_for(ctx: EngineContext) -> dns.asyncresolver.Resolver:
    """The cached resolver of a context: its nameservers, its timeout, a shared cache."""
    resolver = _resolvers.get(ctx)
    if resolver is None:
        if ctx.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [_nameserver(s) for s in ctx.nameservers]
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.lifetime = ctx.dns_timeout
        resolver.timeout = min(2.0, ctx.dns_timeout)
        resolver.cache = dns.resolver.LRUCache(10_000)
        _resolvers[ctx] = resolver
    return resolver


def _normalize(name: str) -> str:
    return name.rstrip(".").lower()


async def _query(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str):
    qname = dns.name.from_text(name)  # absolute: no search list
    return await resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)


async def _addresses(resolver: dns.asyncresolver.Resolver, host: str) -> tuple[tuple[str, ...], Optional[BaseException]]:
    """A then AAAA addresses of `host`; the error kept when a lookup failed temporarily."""
    results = await asyncio.gather(_query(resolver, host, "A"), _query(resolver, host, "AAAA"),
                                   return_exceptions=True)
    found: list[str] = []
    temporary: Optional[BaseException] = None
    for result in results:
        if isinstance(result, dns.resolver.NXDOMAIN):
            continue
        if isinstance(result, BaseException):
            if not isinstance(result, dns.exception.DNSException):
                raise result
            temporary = result
            continue
        if result.rrset is not None:
            found.extend(rr.address for rr in result.rrset)
    return tuple(dict.fromkeys(found)), (None if found else temporary)


async def resolve(domain: str, ctx: EngineContext) -> MxResult:
    """The hosts to try for `domain`, in order, each with its addresses; or an Outcome.

    * MX records: sorted by preference, shuffled within one preference;
    * a null MX (`MX 0 .`): final `556 5.1.10`, no host;
    * no MX: the domain's own A/AAAA records (implicit MX);
    * NXDOMAIN: final `550 5.1.2`; SERVFAIL or timeout: temporary `4.4.3`;
    * no address for any host: `550 5.4.4` (permanent, not final) unless a lookup failed
      temporarily.

    The Outcome's engine is '' (the caller fills it in).
    """
    domain = _normalize(domain)
    try:
        return await _resolve(domain, ctx)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return MxResult(domain, outcome=oc.classify(exc, engine="", host=None, stage=Stage.DNS))


async def _resolve(domain: str, ctx: EngineContext) -> MxResult:
    resolver = resolver_for(ctx)
    try:
        dns.name.from_text(domain)
    except (dns.exception.DNSException, UnicodeError) as exc:
        return MxResult(domain, outcome=oc.bad_domain(domain, _why(exc), engine=""))
    try:
        answer = await _query(resolver, domain, "MX")
    except dns.resolver.NXDOMAIN as exc:
        return MxResult(domain, outcome=oc.classify(exc, engine="", host=None, stage=Stage.DNS))
    except dns.exception.DNSException as exc:
        return MxResult(domain, outcome=oc.dns_temporary(domain, _why(exc), engine=""))

    records = list(answer.rrset) if answer.rrset is not None else []
    if not records:
        addrs, error = await _addresses(resolver, domain)
        if addrs:
            return MxResult(domain, (MxHost(domain, 0, addrs),), implicit=True)
        if error is not None:
            return MxResult(domain, outcome=oc.dns_temporary(domain, _why(error), engine=""))
        return MxResult(domain, outcome=oc.no_route(domain, engine=""))

    real = [rr for rr in records if rr.exchange != dns.name.root]
    if not real:
        return MxResult(domain, outcome=oc.null_mx(domain, engine=""))
    if len(real) != len(records):
        log.warning("%s publishes a null MX beside other MX records; ignoring the null MX", domain)

    by_pref: dict[int, list[str]] = {}
    for rr in real:
        name = _normalize(rr.exchange.to_text())
        group = by_pref.setdefault(int(rr.preference), [])
        if name not in group:
            group.append(name)
    ordered: list[tuple[int, str]] = []
    for pref in sorted(by_pref):
        group = by_pref[pref]
        random.shuffle(group)  # spread load over equal-preference hosts (RFC 5321 §5.1)
        ordered.extend((pref, name) for name in group)

    lookups = await asyncio.gather(*(_addresses(resolver, name) for _, name in ordered))
    hosts = []
    temporary: Optional[BaseException] = None
    for (pref, name), (addrs, error) in zip(ordered, lookups):
        if addrs:
            hosts.append(MxHost(name, pref, addrs))
        elif error is not None:
            temporary = error
    if hosts:
        return MxResult(domain, tuple(hosts))
    if temporary is not None:
        return MxResult(domain, outcome=oc.dns_temporary(domain, _why(temporary), engine=""))
    return MxResult(domain, outcome=oc.no_route(domain, engine=""))


def _why(exc: BaseException) -> str:
    if isinstance(exc, (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong)):
        return str(exc) or type(exc).__name__
    if isinstance(exc, dns.resolver.NoNameservers):
        return "server failure (SERVFAIL)"
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    return type(exc).__name__


async def mx_names(domain: str, ctx: EngineContext) -> tuple[str, ...]:
    """The MX host names of `domain` in preference order (for `mx` rules).

    Lower case without the trailing dot. Empty when the domain has no MX, a null MX,
    does not exist, or the lookup fails (logged); never raises.
    """
    domain = _normalize(domain)
    try:
        answer = await _query(resolver_for(ctx), domain, "MX")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("MX lookup for %s failed: %s", domain, _why(exc))
        return ()
    if answer.rrset is None:
        return ()
    records = sorted((int(rr.preference), _normalize(rr.exchange.to_text()))
                     for rr in answer.rrset if rr.exchange != dns.name.root)
    return tuple(dict.fromkeys(name for _, name in records))
