"""Parse tree -> AST: the lark Transformer that builds the typed nodes of ast.py.

Owns the shape of the tree only: it folds the seed's wording (`<destination mail
server>`, `<aol.com>`, `first:[host]`) and every field alias into the canonical nodes
and gives each node its Span. It runs inside the LALR parser (no intermediate tree),
so it is stateless and never raises for semantic problems: an unknown field is built
as a Field with name None and lint.py reports it.
"""
from __future__ import annotations

from typing import Any

from lark import Token, Transformer

from routedsl import ast as A
from routedsl.ast import Span


def token_span(tok: Token) -> Span:
    return Span(tok.line, tok.column, tok.end_line, tok.end_column)


def _pos(it: Any) -> Span | None:
    if isinstance(it, Token):
        return Span(it.line, it.column, it.end_line, it.end_column)
    return getattr(it, "span", None)


def span_of(items: list[Any]) -> Span:
    """From the first to the last child that has a position."""
    a, b = _pos(items[0]), _pos(items[-1])
    if a is not None and b is not None:
        return Span(a[0], a[1], b[2], b[3])
    first = last = None
    for it in items:
        s = token_span(it) if isinstance(it, Token) else getattr(it, "span", None)
        if s is not None:
            if first is None:
                first = s
            last = s
    return first.to(last) if first and last else A.NOWHERE


def unquote(raw: str) -> str:
    out, i = [], 1
    while i < len(raw) - 1:
        c = raw[i]
        if c == "\\" and i + 1 < len(raw) - 1:
            i += 1
            c = raw[i]
        out.append(c)
        i += 1
    return "".join(out)


def _words(items: list[Any], kind: str) -> list[Token]:
    return [t for t in items if isinstance(t, Token) and t.type == kind]


def _flat(kind: type, items: list[Any]) -> Any:
    """`a and (b and c)` -> And(a, b, c) (likewise `or`), keywords dropped."""
    ops: list[Any] = []
    for it in items:
        if isinstance(it, kind):
            ops.extend(it.operands)
        elif not isinstance(it, Token):
            ops.append(it)
    if len(ops) == 1:          # a lone operand: the rule's `?` inlining does not apply to aliases
        return ops[0]
    return kind(tuple(ops), span_of(items))


class AstBuilder(Transformer):
    """Callbacks named after the grammar's rules and aliases."""

    # ---- values
    def value(self, items: list[Token]) -> A.Value:
        for t in items:
            if t.type == "WORD":
                return A.Value(str(t), span_of(items))
            if t.type == "STRING":
                return A.Value(unquote(str(t)), span_of(items), True)
        return A.Value("", span_of(items))          # `<>`: the empty (null) sender

    def optval(self, items: list[Any]) -> tuple[A.Value, bool, bool]:
        (it,) = items
        if isinstance(it, Token):                  # REF: env:VAR, file:PATH, smtp://...
            return A.Value(str(it), token_span(it)), True, False
        return it, False, False

    def target(self, items: list[Token]) -> A.Value:
        return A.Value(str(items[0]), token_span(items[0]))

    def field(self, items: list[Token]) -> A.Field:
        written = " ".join(str(t) for t in _words(items, "WORD"))
        return A.Field(written, A.FIELD_ALIASES.get(" ".join(written.lower().split())), span_of(items))

    # ---- conditions
    def is_(self, items: list[Any]) -> A.Is:
        return A.Is(items[0], (items[-1],), False, False, span_of(items))

    def is_not(self, items: list[Any]) -> A.Is:
        return A.Is(items[0], (items[-1],), True, False, span_of(items))

    def one_of(self, items: list[Any]) -> A.Is:
        vals = tuple(v for v in items if isinstance(v, A.Value))
        return A.Is(items[0], vals, False, True, span_of(items))

    def not_one_of(self, items: list[Any]) -> A.Is:
        vals = tuple(v for v in items if isinstance(v, A.Value))
        return A.Is(items[0], vals, True, True, span_of(items))

    def matches(self, items: list[Any]) -> A.Matches:
        return A.Matches(items[0], items[-1], span_of(items))

    def larger(self, items: list[Any]) -> A.Compare:
        return A.Compare(items[0], "larger", items[-1], span_of(items))

    def smaller(self, items: list[Any]) -> A.Compare:
        return A.Compare(items[0], "smaller", items[-1], span_of(items))

    def not_(self, items: list[Any]) -> A.Not:
        return A.Not(items[-1], span_of(items))

    def group(self, items: list[Any]) -> Any:
        return items[1]

    def and_(self, items: list[Any]) -> Any:
        return _flat(A.And, items)

    def or_(self, items: list[Any]) -> Any:
        return _flat(A.Or, items)

    # ---- statements
    def name(self, items: list[Token]) -> A.Name:
        (t,) = items
        text = unquote(str(t)) if t.type == "STRING" else str(t)
        return A.Name(text.lower(), text, token_span(t))

    def engine_list(self, items: list[Any]) -> tuple[A.Name, ...]:
        return tuple(i for i in items if isinstance(i, A.Name))

    def seed_phrase(self, items: list[Token]) -> None:
        return None

    def try_first(self, items: list[Any]) -> A.Action:
        (names,) = [i for i in items if isinstance(i, tuple)]
        return A.Action("first", names, span_of(items))

    def use_only(self, items: list[Any]) -> A.Action:
        (names,) = [i for i in items if isinstance(i, tuple)]
        return A.Action("only", names, span_of(items))

    def rule(self, items: list[Any]) -> A.Rule:
        cond = items[1]
        return A.Rule(cond, items[-1], span_of(items))

    def option(self, items: list[Any]) -> A.Option:
        key, (val, is_ref, _) = items[0], items[1]
        return A.Option(str(key).lower(), val, is_ref, span_of([key, val]), token_span(key))

    def max_size_option(self, items: list[Any]) -> A.Option:
        val, is_ref, _ = items[2]
        return A.Option("max size", val, is_ref, span_of([items[0], val]), span_of(items[:2]))

    def engine_decl(self, items: list[Any]) -> A.EngineDecl:
        name = items[1]
        opts = tuple(i for i in items[4:] if isinstance(i, A.Option))
        return A.EngineDecl(name, items[3], opts, span_of(items))

    def to_clause(self, items: list[Any]) -> tuple[str, Any, Span]:
        return "to", items[1], span_of(items)

    def from_clause(self, items: list[Any]) -> tuple[str, Any, Span]:
        return "from", items[1], span_of(items)

    def size_clause(self, items: list[Any]) -> tuple[str, Any, Span]:
        return "size", items[1], span_of(items)

    def mx_clause(self, items: list[Any]) -> tuple[str, Any, Span]:
        return "mx", tuple(v for v in items if isinstance(v, A.Value)), span_of(items)

    def clause(self, items: list[Any]) -> Any:   # never reached: every clause has an alias
        return items[0]

    def expect(self, items: list[Any]) -> A.Expect:
        got: dict[str, Any] = {}
        repeated: list[str] = []
        for it in items:
            if isinstance(it, tuple) and len(it) == 3 and isinstance(it[0], str):
                if it[0] in got:
                    repeated.append(it[0])
                got[it[0]] = it[1]
        engines = items[-1]
        return A.Expect(got.get("to"), got.get("from"), got.get("size"), got.get("mx", ()),
                        engines, span_of(items), tuple(repeated))

    def start(self, items: list[Any]) -> A.RulesFile:
        return A.RulesFile(tuple(i for i in items if not isinstance(i, Token)))

