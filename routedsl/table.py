"""The compiled route table and the values it hands out.

(Interface first: the dataclasses below are the seam the relay is written against;
the RouteTable itself is filled in with the compiler.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

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
