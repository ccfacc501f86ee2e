"""NaiveTable: the reference evaluator — every rule, top to bottom, straight from the AST.

Owns nothing the relay uses. It exists so tests can compare RouteTable.plan (indexes
and closures) with the plainest reading of the spec; keep it simple rather than fast.
"""
from __future__ import annotations

import re
from typing import Iterable

from routedsl import ast as A
from routedsl.lint import DOMAIN_FIELDS, plan_of
from routedsl.table import Decision, EngineSpec, RuleRef
from routedsl.values import domain_of, normalize_domain, parse_size


def _lower(field: str, text: str) -> str:
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if field in DOMAIN_FIELDS:
        return normalize_domain(text)
    local, at, domain = text.rpartition("@")
    return local.lower() + at + normalize_domain(domain) if at else text.lower()


def _is(pattern: str, value: str) -> bool:
    if "*" not in pattern:
        return pattern == value
    rx = "^" + ".+".join(re.escape(p) for p in pattern.split("*")) + "$"
    return re.match(rx, value, re.IGNORECASE | re.DOTALL) is not None


class NaiveTable:
    def __init__(self, rf: A.RulesFile, engines: tuple[EngineSpec, ...], filename: str = "routes.rules") -> None:
        self.rules = rf.rules
        self.order = tuple(e.name for e in engines)
        self.filename = filename

    def _values(self, field: str, recipient: str, sender: str, mx: tuple[str, ...]) -> list[str]:
        if field == "recipient":
            return [_lower(field, recipient)]
        if field == "destination":
            return [domain_of(recipient)]
        if field == "from":
            return [_lower(field, sender)]
        if field == "from domain":
            return [domain_of(sender)]
        return [normalize_domain(h) for h in mx]

    def holds(self, c: A.Condition, recipient: str, sender: str, size: int, mx: tuple[str, ...]) -> bool:
        if isinstance(c, A.Not):
            return not self.holds(c.operand, recipient, sender, size, mx)
        if isinstance(c, A.And):
            return all(self.holds(o, recipient, sender, size, mx) for o in c.operands)
        if isinstance(c, A.Or):
            return any(self.holds(o, recipient, sender, size, mx) for o in c.operands)
        field = c.field.name or ""
        if isinstance(c, A.Compare):
            limit = parse_size(c.value.text)
            return size > limit if c.op == "larger" else size < limit
        values = self._values(field, recipient, sender, mx)
        if isinstance(c, A.Matches):
            return any(re.search(c.pattern.text, v, re.IGNORECASE) for v in values)
        hit = any(_is(_lower(field, p.text), v) for v in values for p in c.values)
        return hit != c.negated

    def plan(self, recipient: str, sender: str = "", size: int = 0, mx: Iterable[str] = ()) -> Decision:
        mx = tuple(mx)
        for rule in self.rules:
            if self.holds(rule.condition, recipient, sender, size, mx):
                return Decision(plan_of(rule.action, self.order), RuleRef(self.filename, rule.span.line, str(rule)))
        return Decision(self.order, None)
