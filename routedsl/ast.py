"""The typed syntax tree of a routes file.

Owns the node types: frozen, slotted dataclasses, each with a Span that takes no part
in equality (so the seed's wording and the short form give equal trees), and a
canonical `str()` that prints the node as one line of the short form. Nodes record
what was written; they never judge it (lint.py does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Optional, Union

from routedsl.values import format_size, parse_size


class Span(NamedTuple):
    """Where a node is written: 1-based lines and columns; end_column is exclusive, like lark."""
    line: int
    column: int
    end_line: int
    end_column: int

    def to(self, other: "Span") -> "Span":
        return Span(self.line, self.column, other.end_line, other.end_column)


NOWHERE = Span(1, 1, 1, 1)

_BARE = re.compile(r"[\w.@+*/-]+")
_KEYWORDS = frozenset(
    "engine if then try first use only this these delivery engines is not one of larger bigger greater "
    "smaller less than matches and or max size expect mail to from with mx goes via".split()
)


def qstring(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote(text: str) -> str:
    """A value as it is written canonically: bare when it can be, else a quoted string."""
    if text == "":
        return "<>"
    if _BARE.fullmatch(text) and text.lower() not in _KEYWORDS:
        return text
    return qstring(text)


@dataclass(frozen=True, slots=True)
class Value:
    text: str
    span: Span = field(default=NOWHERE, compare=False)
    quoted: bool = field(default=False, compare=False)   # written as "..."

    def __str__(self) -> str:
        return quote(self.text)


@dataclass(frozen=True, slots=True)
class Name:
    """An engine name: `key` is lower-cased (names are case-insensitive), `text` as written."""
    key: str
    text: str = field(default="", compare=False)
    span: Span = field(default=NOWHERE, compare=False)

    def __str__(self) -> str:
        return quote(self.key)


# ---------------------------------------------------------------- conditions

FieldName = Literal["destination", "recipient", "from", "from domain", "size", "mx"]

FIELD_ALIASES: dict[str, str] = {
    "destination": "destination", "destination mail server": "destination",
    "destination domain": "destination", "to domain": "destination",
    "recipient": "recipient", "to": "recipient", "to address": "recipient",
    "from": "from", "from address": "from", "sender": "from",
    "from domain": "from domain", "sender domain": "from domain",
    "size": "size", "mail size": "size", "message size": "size",
    "mx": "mx", "mx host": "mx",
}


@dataclass(frozen=True, slots=True)
class Field:
    """A field as written; `name` is the canonical field, or None when unknown (lint reports it)."""
    written: str = field(compare=False)
    name: Optional[str]
    span: Span = field(default=NOWHERE, compare=False)

    def __str__(self) -> str:
        return self.name or self.written


@dataclass(frozen=True, slots=True)
class Is:
    """`F is V`, `F is not V`, `F is one of V1, V2`, `F is not one of ...`."""
    field: Field
    values: tuple[Value, ...]
    negated: bool = False
    one_of: bool = False
    span: Span = field(default=NOWHERE, compare=False)

    def __str__(self) -> str:
        op = "is not" if self.negated else "is"
        if self.one_of:
            return f"{self.field} {op} one of {', '.join(map(str, self.values))}"
        return f"{self.field} {op} {self.values[0]}"


@dataclass(frozen=True, slots=True)
class Matches:
    field: Field
    pattern: Value
    span: Span = field(default=NOWHERE, compare=False)

    def __str__(self) -> str:
        return f"{self.field} matches {qstring(self.pattern.text)}"


@dataclass(frozen=True, slots=True)
class Compare:
    """`F is larger than V` / `F is smaller than V` (only sizes make sense; lint checks)."""
    field: Field
    op: Literal["larger", "smaller"]
    value: Value
    span: Span = field(default=NOWHERE, compare=False)

    def __str__(self) -> str:
        try:
            shown = format_size(parse_size(self.value.text))
        except ValueError:
            shown = str(self.value)
        return f"{self.field} is {self.op} than {shown}"


@dataclass(frozen=True, slots=True)
class Not:
    operand: "Condition"
    span: Span = field(default=NOWHERE, compare=False)

    def __str__(self) -> str:
        inner = str(self.operand)
        return f"not ({inner})" if isinstance(self.operand, (And, Or, Not)) else f"not {inner}"


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple["Condition", ...]
    span: Span = field(default=NOWHERE, compare=False)

    def __str__(self) -> str:
        return " and ".join(f"({o})" if isinstance(o, Or) else str(o) for o in self.operands)


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple["Condition", ...]
    span: Span = field(default=NOWHERE, compare=False)

    def __str__(self) -> str:
        return " or ".join(map(str, self.operands))


Condition = Union[Is, Matches, Compare, Not, And, Or]
Atom = Union[Is, Matches, Compare]


# ---------------------------------------------------------------- statements

@dataclass(frozen=True, slots=True)
class Option:
    key: str                 # lower-cased as written ("max size" for the two-word option)
    value: Value
    is_ref: bool = False     # written as scheme:rest (env:VAR, file:PATH)
    span: Span = field(default=NOWHERE, compare=False)
    key_span: Span = field(default=NOWHERE, compare=False)

    def __str__(self) -> str:
        shown = self.value.text if self.is_ref else str(self.value)
        if self.value.quoted and not self.is_ref:
            shown = qstring(self.value.text)
        return f"{self.key} {shown}"


@dataclass(frozen=True, slots=True)
class EngineDecl:
    name: Name
    target: Value            # "direct" or the URL as written
    options: tuple[Option, ...]
    span: Span = field(default=NOWHERE, compare=False)

    def __str__(self) -> str:
        opts = "".join(" " + str(o) for o in self.options)
        return f"engine {self.name} = {self.target.text}{opts}"


@dataclass(frozen=True, slots=True)
class Action:
    mode: Literal["first", "only"]
    engines: tuple[Name, ...]
    span: Span = field(default=NOWHERE, compare=False)

    def __str__(self) -> str:
        names = ", ".join(map(str, self.engines))
        return f"try {names} first" if self.mode == "first" else f"use only {names}"


@dataclass(frozen=True, slots=True)
class Rule:
    condition: Condition
    action: Action
    span: Span = field(default=NOWHERE, compare=False)

    def __str__(self) -> str:
        return f"if {self.condition} then {self.action}"


@dataclass(frozen=True, slots=True)
class Expect:
    to: Optional[Value]
    sender: Optional[Value]
    size: Optional[Value]
    mx: tuple[Value, ...]
    engines: tuple[Name, ...]
    span: Span = field(default=NOWHERE, compare=False)
    repeated: tuple[str, ...] = field(default=(), compare=False)   # clauses given twice

    def __str__(self) -> str:
        parts = ["expect mail"]
        if self.sender is not None:
            parts.append(f"from {self.sender}")
        if self.to is not None:
            parts.append(f"to {self.to}")
        if self.size is not None:
            parts.append(f"size {self.size}")
        if self.mx:
            parts.append("with mx " + ", ".join(map(str, self.mx)))
        parts.append("goes via " + ", ".join(map(str, self.engines)))
        return " ".join(parts)


Statement = Union[EngineDecl, Rule, Expect]


@dataclass(frozen=True, slots=True)
class RulesFile:
    statements: tuple[Statement, ...]

    @property
    def engines(self) -> tuple[EngineDecl, ...]:
        return tuple(s for s in self.statements if isinstance(s, EngineDecl))

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(s for s in self.statements if isinstance(s, Rule))

    @property
    def expects(self) -> tuple[Expect, ...]:
        return tuple(s for s in self.statements if isinstance(s, Expect))

    def __str__(self) -> str:
        return "\n".join(map(str, self.statements)) + ("\n" if self.statements else "")
