"""AST -> RouteTable: conditions become closures, and rules are filed in indexes.

Owns the compiled form of the rules. Each condition becomes one closure over a
normalized query tuple. A rule is filed under a key only when every message it can
match must carry that key: an `is` / `is one of` at the top, one conjunct of a top-level
`and`, or every branch of an `or`; never anything under `not`. Keys are exact values
(domains, addresses, MX hosts), `*.domain` suffixes (found by walking the query's
domain suffixes) and, for rules that test only the size, a threshold table. Rules that
no index can hold are always candidates. plan() runs the candidates' closures in rule
order, so the first matching rule decides exactly as a top-to-bottom scan would.
Expects a file that passed lint; never parses or reports.
"""
from __future__ import annotations

import hashlib
import re
from bisect import bisect_left, bisect_right
from typing import Callable, Optional

from routedsl import ast as A
from routedsl.lint import DOMAIN_FIELDS, norm, plan_of
from routedsl.table import Decision, EngineSpec, Query, RouteTable, RuleRef
from routedsl.values import domain_of, domain_suffixes, parse_size, suffix_wildcard, wildcard_regex

Pred = Callable[[Query], bool]

FIELD_INDEX = {"recipient": 0, "destination": 1, "from": 2, "from domain": 3, "size": 4, "mx": 5}
MX = 5
# `recipient is *@example.com` implies destination example.com (and `from` likewise)
_DOMAIN_OF_ADDRESS = {0: 1, 2: 3}


# ---------------------------------------------------------------- conditions -> closures

def _value_test(field: str, values: tuple[A.Value, ...]) -> tuple[set[str], list[Callable[[str], object]]]:
    lits: set[str] = set()
    pats: list[Callable[[str], object]] = []
    for v in values:
        t = norm(field, v.text)
        wild = suffix_wildcard(t) if field in DOMAIN_FIELDS else None
        if wild:
            dot = "." + wild
            pats.append(lambda h, dot=dot: len(h) > len(dot) and h.endswith(dot))
        elif "*" in t:
            pats.append(wildcard_regex(t).fullmatch)
        else:
            lits.add(t)
    return lits, pats


def compile_cond(c: A.Condition) -> Pred:
    if isinstance(c, A.Is):
        field = c.field.name or ""
        i = FIELD_INDEX[field]
        lits, pats = _value_test(field, c.values)
        if i == MX:
            def one(h: str, lits: set[str] = lits, pats: list = pats) -> bool:
                return h in lits or any(p(h) for p in pats)
            pred: Pred = lambda q: any(one(h) for h in q[MX])
        elif not pats and len(lits) == 1:
            (v,) = lits
            pred = lambda q: q[i] == v
        elif not pats:
            pred = lambda q: q[i] in lits
        else:
            pred = lambda q: q[i] in lits or any(p(q[i]) for p in pats)
        if c.negated:
            positive = pred
            return lambda q: not positive(q)
        return pred
    if isinstance(c, A.Matches):
        i = FIELD_INDEX[c.field.name or ""]
        search = re.compile(c.pattern.text, re.IGNORECASE).search
        if i == MX:
            return lambda q: any(search(h) is not None for h in q[MX])
        return lambda q: search(q[i]) is not None
    if isinstance(c, A.Compare):
        limit = parse_size(c.value.text)
        if c.op == "larger":
            return lambda q: q[4] > limit
        return lambda q: q[4] < limit
    if isinstance(c, A.Not):
        inner = compile_cond(c.operand)
        return lambda q: not inner(q)
    if isinstance(c, A.And):
        preds = [compile_cond(o) for o in c.operands]
        if len(preds) == 2:
            a, b = preds
            return lambda q: a(q) and b(q)
        return lambda q: all(p(q) for p in preds)
    if isinstance(c, A.Or):
        preds = [compile_cond(o) for o in c.operands]
        if len(preds) == 2:
            a, b = preds
            return lambda q: a(q) or b(q)
        return lambda q: any(p(q) for p in preds)
    raise TypeError(f"not a condition: {c!r}")


# ---------------------------------------------------------------- index keys

Key = tuple[str, int, str]   # ("exact" | "suffix", field index, value)


def index_keys(c: A.Condition) -> Optional[list[Key]]:
    """Keys such that a message matching `c` has at least one of them; None when there are none."""
    if isinstance(c, A.Is) and not c.negated:
        field = c.field.name or ""
        i = FIELD_INDEX[field]
        keys: list[Key] = []
        for v in c.values:
            t = norm(field, v.text)
            if "*" not in t:
                keys.append(("exact", i, t))
            elif field in DOMAIN_FIELDS and (wild := suffix_wildcard(t)):
                keys.append(("suffix", i, wild))
            elif i in _DOMAIN_OF_ADDRESS and t.startswith("*@") and "*" not in t[2:]:
                keys.append(("exact", _DOMAIN_OF_ADDRESS[i], domain_of(t)))
            else:
                return None
        return keys
    if isinstance(c, A.And):
        options = [k for k in (index_keys(o) for o in c.operands) if k]
        if not options:
            return None
        # fewest, most selective keys: exact before suffix
        return min(options, key=lambda ks: (any(k[0] == "suffix" for k in ks), len(ks)))
    if isinstance(c, A.Or):
        out: list[Key] = []
        for o in c.operands:
            ks = index_keys(o)
            if not ks:
                return None
            out += ks
        return out
    return None


def _size_only(c: A.Condition) -> Optional[tuple[str, int]]:
    if isinstance(c, A.Compare) and c.field.name == "size":
        return c.op, parse_size(c.value.text)
    return None


class IndexedRouter:
    """First-match over indexed rules; see the module docstring."""

    def __init__(self, conds: list[A.Condition], decide: Callable[[int], Decision]) -> None:
        n = len(conds)
        # A rule that an index hit or the size thresholds alone decide needs no predicate
        # of its own: with 1,000 such rules, that is 1,000 closures, cells and sets less.
        self._preds = [_matched if _size_only(c) is not None or _decided_by_index(c)
                       else compile_cond(c) for c in conds]
        # Decisions are made on first use: their canonical text costs more than the rest of compiling
        self._decide = decide
        self._decisions: list[Optional[Decision]] = [None] * (n + 1)
        self._n = n
        exact: dict[int, dict[str, list[int]]] = {}
        suffix: dict[int, dict[str, list[int]]] = {}
        larger: list[tuple[int, int]] = []
        smaller: list[tuple[int, int]] = []
        always: list[int] = []
        for idx, c in enumerate(conds):
            size = _size_only(c)
            if size is not None:
                (larger if size[0] == "larger" else smaller).append((size[1], idx))
                continue
            keys = index_keys(c)
            if keys is None:
                always.append(idx)
                continue
            for kind, field, value in keys:
                table = exact if kind == "exact" else suffix
                lst = table.setdefault(field, {}).setdefault(value, [])
                if not lst or lst[-1] != idx:
                    lst.append(idx)
        self._exact = tuple((f, d) for f, d in sorted(exact.items()) if f != MX)
        self._suffix = tuple((f, d) for f, d in sorted(suffix.items()) if f != MX)
        self._mx_exact = exact.get(MX)
        self._mx_suffix = suffix.get(MX)
        self._always = tuple(always)
        # size > T matches when T < size: among thresholds sorted ascending, a prefix; keep its earliest rule
        larger.sort()
        self._larger_t = [t for t, _ in larger]
        self._larger_min = _running_min([i for _, i in larger])
        smaller.sort()
        self._smaller_t = [t for t, _ in smaller]
        self._smaller_min = _running_min([i for _, i in reversed(smaller)])[::-1]

    def first(self, q: Query) -> Optional[Decision]:
        best = self._n
        if self._larger_t:
            k = bisect_left(self._larger_t, q[4])
            if k:
                best = self._larger_min[k - 1]
        if self._smaller_t:
            k = bisect_right(self._smaller_t, q[4])
            if k < len(self._smaller_t) and self._smaller_min[k] < best:
                best = self._smaller_min[k]
        cands: list[int] = []
        for f, d in self._exact:
            lst = d.get(q[f])
            if lst:
                cands += lst
        for f, d in self._suffix:
            for s in domain_suffixes(q[f]):
                lst = d.get(s)
                if lst:
                    cands += lst
        if q[MX] and (self._mx_exact or self._mx_suffix):
            for h in q[MX]:
                if self._mx_exact:
                    cands += self._mx_exact.get(h, ())
                if self._mx_suffix:
                    for s in domain_suffixes(h):
                        cands += self._mx_suffix.get(s, ())
        preds = self._preds
        if cands:
            if len(cands) > 1:
                cands = sorted(set(cands))
            for idx in cands:
                if idx >= best:
                    break
                if preds[idx](q):
                    best = idx
                    break
        for idx in self._always:
            if idx >= best:
                break
            if preds[idx](q):
                best = idx
                break
        if best == self._n:
            return None
        d = self._decisions[best]
        if d is None:
            d = self._decisions[best] = self._decide(best)
        return d


def _matched(_q: Query) -> bool:
    return True


def _decided_by_index(c: A.Condition) -> bool:
    """An exact index hit alone proves `c`: one `is` test, not negated, of literal values
    (no wildcard); its keys are exactly those values, so a hit is one of them."""
    if not isinstance(c, A.Is) or c.negated:
        return False
    field = c.field.name or ""
    return all("*" not in norm(field, v.text) for v in c.values)


def _running_min(xs: list[int]) -> list[int]:
    out, cur = [], None
    for x in xs:
        cur = x if cur is None or x < cur else cur
        out.append(cur)
    return out


# ---------------------------------------------------------------- the table

def uses_mx(c: A.Condition) -> bool:
    if isinstance(c, (A.And, A.Or)):
        return any(uses_mx(o) for o in c.operands)
    if isinstance(c, A.Not):
        return uses_mx(c.operand)
    return c.field.name == "mx"


def version_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def build_table(rf: A.RulesFile, engines: tuple[EngineSpec, ...], text: str, filename: str) -> RouteTable:
    order = tuple(e.name for e in engines)
    rules = rf.rules
    # What a decision needs of each rule: its plan (one tuple per distinct plan), line and
    # text, not its syntax tree (the condition is compiled into predicates below), which
    # the table would otherwise keep alive as long as it lives. Decisions themselves are
    # still made on first use.
    plans: dict[tuple[str, ...], tuple[str, ...]] = {}
    said = []
    for r in rules:
        plan = plan_of(r.action, order)
        said.append((plans.setdefault(plan, plan), r.span.line, str(r)))

    def decide(i: int) -> Decision:
        plan, line, text = said[i]
        return Decision(plan, RuleRef(filename, line, text))

    router = IndexedRouter([r.condition for r in rules], decide)
    return RouteTable(engines, router, Decision(order, None), rule_count=len(rules),
                      expect_count=len(rf.expects), needs_mx=any(uses_mx(r.condition) for r in rules),
                      version=version_of(text), source=filename)
