"""Text -> AST, and syntax errors as diagnostics.

Owns loading the grammar (through the installed package first, the checkout's
`grammar/` folder second), the one cached LALR parser (the AST is built during the
parse, no parse tree), the Scanner that feeds it (a contextual lexer made from the
grammar's own terminals; lark's own lexer with LinePostLexer is the reference the
tests compare it with), and turning lark's exceptions into `syntax-error` diagnostics
that say what was expected in words. After an error it blanks the broken statement
and parses again, so one run reports several errors. Never raises on any input text.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Iterator, Optional

from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from routedsl import ast as A
from routedsl.build import AstBuilder
from routedsl.diagnostics import Diagnostic, did_you_mean, make, normalize_text, printable

GRAMMAR_NAME = "routes.lark"
MAX_SYNTAX_ERRORS = 10


def grammar_text() -> str:
    """The grammar shipped in the wheel, or the checkout's grammar/routes.lark (editable install)."""
    here = Path(__file__).resolve().parent
    shipped = here / GRAMMAR_NAME   # the wheel puts it beside this module (pyproject.toml)
    if shipped.is_file():
        return shipped.read_text(encoding="utf-8")
    return (here.parent / "grammar" / GRAMMAR_NAME).read_text(encoding="utf-8")


class LinePostLexer:
    """Drops newlines inside parentheses and makes sure the last statement ends with one."""

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        last: Optional[Token] = None
        for tok in stream:
            if tok.type == "_NL":
                if depth:
                    continue
            elif tok.type == "LPAR":
                depth += 1
            elif tok.type == "RPAR" and depth:
                depth -= 1
            last = tok
            yield tok
        if last is not None and last.type != "_NL":
            yield Token("_NL", "\n", last.end_pos, last.end_line, last.end_column,
                        last.end_line, last.end_column, last.end_pos)


def make_parser(strict: bool = False, transform: bool = True) -> Lark:
    return Lark(grammar_text(), parser="lalr", lexer="contextual", postlex=LinePostLexer(),
                transformer=AstBuilder() if transform else None, maybe_placeholders=False,
                strict=strict, cache=False)


@functools.cache
def parser() -> Lark:
    """The one parser; read-only after construction, so it is shared safely."""
    return make_parser()


# ---------------------------------------------------------------- the fast contextual scanner

class Scanner:
    """A contextual lexer built from the grammar's own terminals, feeding the LALR parser directly.

    It does what lark's contextual lexer does (a keyword is a keyword only where the
    parser state accepts it; REF only where a URL or secret may stand) at a fraction of
    the cost, which matters for 10,000-rule files. The grammar stays the one definition:
    every pattern here comes from parser().terminals. A property test checks that it
    agrees with lark's own lexer.
    """

    def __init__(self, lark: Lark) -> None:
        from lark.lexer import PatternStr
        terms = {t.name: t for t in lark.terminals}
        word = re.compile(terms["WORD"].pattern.to_regexp())
        self.keywords: dict[str, str] = {}
        punct: dict[str, str] = {}
        for t in lark.terminals:
            if isinstance(t.pattern, PatternStr):
                if word.fullmatch(t.pattern.value):
                    self.keywords[t.pattern.value.lower()] = t.name
                else:
                    punct[t.pattern.value] = t.name
        self.ignore = frozenset(lark.ignore_tokens)
        order = sorted(self.ignore) + ["_NL", "STRING", "WORD"]
        parts = [f"(?P<{n}>{terms[n].pattern.to_regexp()})" for n in order]
        parts += [f"(?P<{n}>{re.escape(v)})" for v, n in punct.items()]
        # leading blanks are skipped inside the same match: one regex call per token
        self.master = re.compile(r"[\t \f]*(?:" + "|".join(parts) + ")")
        self.ref = re.compile(r"[\t \f]*(?P<REF>" + terms["REF"].pattern.to_regexp() + ")")
        self.states = lark.parser.parser.parser.parse_table.states   # LALR table: state -> {terminal: action}

    def parse(self, text: str) -> A.RulesFile:
        ip = parser().parse_interactive("")
        pstate = ip.parser_state
        feed = pstate.feed_token
        states, keywords, ignore = self.states, self.keywords, self.ignore
        master_match, ref_match = self.master.match, self.ref.match
        new_token = getattr(Token, "_future_new", Token)   # Token(...) minus its keyword-compatibility layer
        pos, line, line_start, n = 0, 1, 0, len(text)
        depth = 0
        last: Optional[Token] = None
        while pos < n:
            accepts = states[pstate.position]
            m = ref_match(text, pos) if "REF" in accepts else None
            kind = "REF"
            if m is None:
                m = master_match(text, pos)
                if m is None:
                    raise UnexpectedCharacters(text, pos, line, pos - line_start + 1,
                                               allowed={k for k in accepts if k.isupper()})
                kind = m.lastgroup
            value = m.group(kind)
            start, end = m.start(kind), m.end()
            if start != pos:
                pos = start
            if kind in ignore or kind == "_NL":
                nl = value.count("\n")
                if kind == "_NL" and not depth:
                    tok = new_token("_NL", value, pos, line, pos - line_start + 1, line, pos - line_start + 2, end)
                    feed(tok)
                    last = tok
                if nl:
                    line += nl
                    line_start = pos + value.rfind("\n") + 1
                pos = end
                continue
            if kind == "WORD":
                kw = keywords.get(value.lower())
                if kw is not None and kw in accepts:
                    kind = kw
            elif kind == "LPAR":
                depth += 1
            elif kind == "RPAR" and depth:
                depth -= 1
            col = pos - line_start + 1
            last = new_token(kind, value, pos, line, col, line, col + len(value), end)
            feed(last)
            pos = end
        if last is not None and last.type != "_NL":
            last = Token("_NL", "\n", last.end_pos, last.end_line, last.end_column,
                         last.end_line, last.end_column, last.end_pos)
            feed(last)
        return ip.feed_eof(last)


@functools.cache
def scanner() -> Scanner:
    return Scanner(parser())


# ---------------------------------------------------------------- errors in words

_TERMINAL_WORDS = {
    "WORD": "a name or value", "STRING": "a quoted string",
    "REF": "a URL or password source (smtp://HOST, env:VAR, file:PATH)",
    "_NL": "the end of the line", "$END": "the end of the file",
    "EQUALS": "'='", "COMMA": "','", "LPAR": "'('", "RPAR": "')'", "LT": "'<'", "GT": "'>'",
    "LSQB": "'['", "RSQB": "']'", "COLON": "':'",
    "LARGER": "'larger'", "SMALLER": "'smaller'",
}
_STATEMENT_STARTS = {"ENGINE", "IF", "EXPECT"}


def _word(term: str) -> str:
    return _TERMINAL_WORDS.get(term, f"'{term.lower()}'")


def _expected_words(expected: set[str]) -> str:
    expected = {t for t in expected if not t.startswith("__")}
    extra = set()
    if {"WORD", "STRING"} <= expected:     # wherever a word fits, a quoted string, <x> or a URL does too
        expected -= {"WORD", "STRING", "LT", "REF"}
        extra.add("a value")
    words = sorted({_word(t) for t in expected} | extra)
    if not words:
        return "nothing more"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _describe(tok: Token) -> str:
    if tok.type == "_NL":
        return "end of line"
    if tok.type == "$END":
        return "end of file"
    return f"'{printable(str(tok), 40)}'"


def _syntax_diag(err: UnexpectedInput, filename: str, lines: list[str]) -> Diagnostic:
    line = err.line if isinstance(err.line, int) and err.line > 0 else len(lines)
    col = err.column if isinstance(err.column, int) and err.column > 0 else 1
    hint = None
    if isinstance(err, UnexpectedCharacters):
        ch = lines[line - 1][col - 1] if line <= len(lines) and col <= len(lines[line - 1]) else "?"
        if ch == '"':
            msg = "unterminated string: a quoted string must end on the same line"
        elif ch == "\\":
            msg = "a '\\' continues a statement only at the very end of a line"
        else:
            shown = printable(ch) if ch.isprintable() else f"U+{ord(ch):04X}"
            msg = f"unexpected character '{shown}'; expected {_expected_words(set(err.allowed or ()))}"
        span = A.Span(line, col, line, col + 1)
        return make(filename, span, "error", "syntax-error", msg, hint)
    if isinstance(err, UnexpectedToken):
        tok = err.token
        expected = set(err.expected)
        if tok.type in ("_NL", "$END") and tok.line is not None and tok.line > 0:
            # point at the end of what was written, not at the next line
            line, col = tok.line, tok.column
        span = A.Span(line, col, line, col + max(1, len(str(tok)) if tok.type not in ("_NL", "$END") else 1))
        if tok.type not in ("_NL", "$END") and tok.line != line:
            span = A.Span(tok.line, tok.column, tok.line, tok.column + 1)
        if _STATEMENT_STARTS <= expected:
            msg = f"unexpected {_describe(tok)}: a statement starts with 'engine', 'if' or 'expect'"
            hint = did_you_mean(str(tok), ["engine", "if", "expect"]) if tok.type == "WORD" else None
        elif expected == {"THEN"} or (tok.type == "_NL" and "THEN" in expected):
            msg = f"unexpected {_describe(tok)}: a rule needs 'then' after its condition"
            hint = "write: if CONDITION then try ENGINE first"
        elif expected >= {"IS", "MATCHES"} and tok.type in ("_NL", "$END", "THEN"):
            msg = f"unexpected {_describe(tok)}: expected 'is' or 'matches' after the field"
        elif tok.type in ("_NL", "$END") and "FIRST" in expected:
            msg = f"unexpected {_describe(tok)}; expected 'first' after the engine names"
            hint = "write: try ENGINE[, ENGINE ...] first"
        elif expected == {"WORD", "REF"}:
            msg = (f"unexpected {_describe(tok)}; an engine is direct, smtp://HOST[:PORT] "
                   "or smtps://HOST[:PORT]")
        elif "RPAR" in expected and tok.type in ("_NL", "$END"):
            msg = f"unexpected {_describe(tok)}: a '(' is not closed"
        else:
            msg = f"unexpected {_describe(tok)}; expected {_expected_words(expected)}"
        return make(filename, span, "error", "syntax-error", msg, hint)
    if isinstance(err, UnexpectedEOF):
        return make(filename, A.Span(len(lines), 1, len(lines), 2), "error", "syntax-error",
                    f"the file ends too early; expected {_expected_words(set(err.expected))}")
    return make(filename, A.Span(line, col, line, col + 1), "error", "syntax-error", str(err).splitlines()[0])


_STMT_START = re.compile(r"\s*(engine|if|expect)\b", re.IGNORECASE)
_THEN_START = re.compile(r"\s*then\b", re.IGNORECASE)


def _statement_lines(lines: list[str], line: int) -> tuple[int, int]:
    """The 1-based line range of the statement around `line` (continuations included)."""
    start = line
    while start > 1 and (_THEN_START.match(lines[start - 1]) or lines[start - 2].rstrip().endswith("\\")
                         or not _STMT_START.match(lines[start - 1]) and lines[start - 1].strip()
                         and _open_parens(lines[start - 2]) > 0):
        start -= 1
    end = line
    while end < len(lines) and (_THEN_START.match(lines[end]) or lines[end - 1].rstrip().endswith("\\")
                                or (lines[end].strip() and not _STMT_START.match(lines[end])
                                    and not lines[end].lstrip().startswith("#"))):
        end += 1
    return start, end


def _really_accepted(state: object, expected: set[str]) -> set[str]:
    """The terminals the parser would shift next. LALR merges look-aheads of states that
    reduce alike, so the table's set can name terminals that fail one reduction later;
    trying each on a copy of the stack (without building any nodes) tells them apart."""
    from copy import copy

    from lark.parsers.lalr_parser_state import ParserState

    conf = copy(state.parse_conf)            # type: ignore[attr-defined]
    conf.callbacks = {}
    accepted = set()
    for term in expected:
        trial = ParserState(conf, None, list(state.state_stack), list(state.value_stack))  # type: ignore[attr-defined]
        try:
            trial.feed_token(Token(term, ""), term == "$END")
        except UnexpectedToken:
            continue
        except Exception:                    # anything else means the token got past the table
            pass
        accepted.add(term)
    return accepted or expected


def _starts_statement(tok: Token, lines: list[str]) -> bool:
    """`engine`, `if` or `expect` first on its line (lexed as a word where no keyword fits)."""
    if str(tok).lower() not in ("engine", "if", "expect") or not tok.line or tok.line > len(lines):
        return False
    return not lines[tok.line - 1][: tok.column - 1].strip()


def _incomplete_before(err: UnexpectedToken, lines: list[str]) -> UnexpectedInput:
    """Re-aim an error found at the start of a statement at the end of the line before it."""
    prev = err.token.line - 1
    while prev > 1 and (not lines[prev - 1].strip() or lines[prev - 1].lstrip().startswith("#")):
        prev -= 1
    if prev < 1:
        return err
    col = len(lines[prev - 1].split("#", 1)[0].rstrip()) + 1
    tok = Token("_NL", "\n", 0, prev, col, prev, col + 1, 0)
    return UnexpectedToken(tok, set(err.expected))


def _open_parens(text: str) -> int:
    return text.count("(") - text.count(")")


def parse(text: str, filename: str = "routes.rules") -> tuple[Optional[A.RulesFile], list[Diagnostic]]:
    """Parse the text. Returns the AST (None if there was any syntax error) and the syntax diagnostics."""
    text = normalize_text(text)
    lines = text.split("\n")
    diags: list[Diagnostic] = []
    work = lines
    for _ in range(MAX_SYNTAX_ERRORS):
        try:
            tree = scanner().parse("\n".join(work))
        except UnexpectedInput as err:
            if isinstance(err, UnexpectedToken) and err.state is not None:
                err.expected = _really_accepted(err.state, err.expected)
            if isinstance(err, UnexpectedToken) and _starts_statement(err.token, work) \
                    and not _STATEMENT_STARTS <= set(err.expected):
                err = _incomplete_before(err, work)    # the statement above this one is unfinished
            d = _syntax_diag(err, filename, lines)
            diags.append(d)
            start, end = _statement_lines(work, min(max(d.line, 1), len(work)))
            if all(not work[i].strip() for i in range(start - 1, end)):
                break                              # nothing left to blank: stop here
            work = work[:start - 1] + [""] * (end - start + 1) + work[end:]
            continue
        except RecursionError:
            diags.append(make(filename, A.Span(1, 1, 1, 2), "error", "syntax-error",
                              "the conditions are nested too deeply"))
            return None, diags
        if diags:
            return None, sorted(set(diags), key=lambda d: (d.line, d.column))
        assert isinstance(tree, A.RulesFile)
        return tree, []
    return None, sorted(set(diags), key=lambda d: (d.line, d.column))
