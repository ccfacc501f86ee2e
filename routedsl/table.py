"""The compiled route table and the values it hands out.

Owns RouteTable (immutable; plan() answers which engines, in which order, and why) and
the values that cross into the relay: EngineSpec, SecretRef, RuleRef, Decision. The
router inside a table is built by compile.py; the naive reference evaluator used by
the property tests lives in naive.py. Never parses text and never touches the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Optional, Protocol

from routedsl.values import domain_of, normalize_address, normalize_domain

SecretKind = Literal["env", "file", "literal"]
EngineKind = Literal["direct", "smtp", "smtps"]
TlsPolicy = Literal["required", "opportunistic", "none", "implicit"]


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where an engine's password comes from; `check` never reads it."""
    kind: SecretKind
    value: str


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """One `engine NAME = ...` declaration with every default resolved."""
    name: str
    kind: EngineKind
    host: Optional[str]
    port: int
    user: Optional[str] = None
    password: Optional[SecretRef] = None
    tls: TlsPolicy = "opportunistic"
    verify: bool = True
    helo: Optional[str] = None
    timeout: float = 60.0
    connections: int = 10
    max_size: Optional[int] = None
    line: int = 0


@dataclass(frozen=True, slots=True)
class RuleRef:
    """The rule that decided a plan: where it is and what it says."""
    file: str
    line: int
    text: str


@dataclass(frozen=True, slots=True)
class Decision:
    engines: tuple[str, ...]
    rule: Optional[RuleRef]


# ---------------------------------------------------------------- the compiled table

Query = tuple  # (recipient, destination, sender, sender domain, size, mx hosts), all normalized


def make_query(recipient: str, sender: str, size: int, mx: Iterable[str]) -> Query:
    rcpt = normalize_address(recipient)
    snd = normalize_address(sender)
    if isinstance(mx, str):          # one host name given bare, not as a sequence
        mx = (mx,)
    return (rcpt, domain_of(rcpt), snd, domain_of(snd), size,
            tuple(normalize_domain(h) for h in mx) if mx else ())


class RouteTable:
    """The compiled rules of one file: immutable, answers plan() for every recipient.

    Built by routedsl.compile_text; `plan` asks only the indexes that can hold a match
    (exact values, `*.domain` suffixes, size thresholds) plus the rules no index can
    hold, and runs their predicates in file order, so the first matching rule decides.
    """

    __slots__ = ("engines", "rule_count", "expect_count", "needs_mx", "version", "source",
                 "_by_name", "_router", "_default")

    def __init__(self, engines: tuple[EngineSpec, ...], router: "Router", default: Decision, *,
                 rule_count: int, expect_count: int, needs_mx: bool, version: str, source: str) -> None:
        set_ = object.__setattr__
        set_(self, "engines", engines)
        set_(self, "rule_count", rule_count)
        set_(self, "expect_count", expect_count)
        set_(self, "needs_mx", needs_mx)
        set_(self, "version", version)
        set_(self, "source", source)
        set_(self, "_by_name", {e.name: e for e in engines})
        set_(self, "_router", router)
        set_(self, "_default", default)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a RouteTable is immutable; compile a new one")

    def engine(self, name: str) -> EngineSpec:
        """The engine of that name (case-insensitive); KeyError when there is none."""
        return self._by_name[name.lower()]

    @property
    def engine_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.engines)

    def plan(self, recipient: str, sender: str = "", size: int = 0, mx: Iterable[str] = ()) -> Decision:
        """The engines to try for this recipient, in order, and the rule that decided (None: default order)."""
        decision = self._router.first(make_query(recipient, sender, size, mx))
        return decision if decision is not None else self._default

    def __repr__(self) -> str:
        return (f"RouteTable(source={self.source!r}, version={self.version!r}, engines={len(self.engines)}, "
                f"rules={self.rule_count}, expects={self.expect_count})")


class Router(Protocol):
    def first(self, q: Query) -> Optional[Decision]: ...
