"""AST -> diagnostics: everything `routedsl check` reports beyond syntax.

Owns the meaning checks of spec §5: engine declarations and their options (resolved
into EngineSpec values with every default), names used by rules and expectations,
fields, operators and values of conditions, shadowed rules, rules with no effect, and
failed expectations. Reads no secrets (env:/file: are checked for form only), opens no
files and never raises on a well-formed AST.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from routedsl import ast as A
from routedsl.diagnostics import Diagnostic, did_you_mean, make
from routedsl.table import EngineSpec, SecretRef
from routedsl.values import (domain_suffixes, normalize_address, normalize_domain, parse_bool, parse_duration,
                             parse_engine_url, parse_int, parse_secret_ref, parse_size, suffix_wildcard)

DOMAIN_FIELDS = frozenset({"destination", "from domain", "mx"})
LATER_FIELDS = {"client": "the submitting client's address", "user": "the SMTP AUTH login",
                "header": "a header's value"}
OPTIONS = ("user", "password", "tls", "verify", "port", "helo", "timeout", "connections", "max size")


def norm(field: str, text: str) -> str:
    """A value as a field compares it: domains and addresses in their normal form."""
    return normalize_domain(text) if field in DOMAIN_FIELDS else normalize_address(text)


def _lines(lines: list[int]) -> str:
    lines = sorted(set(lines))
    if len(lines) == 1:
        return f"the rule on line {lines[0]}"
    return "the rules on lines " + ", ".join(map(str, lines[:-1])) + f" and {lines[-1]}"


class Reporter:
    def __init__(self, file: str) -> None:
        self.file = file
        self.diags: list[Diagnostic] = []

    def error(self, span: A.Span, code: str, message: str, hint: Optional[str] = None) -> None:
        self.diags.append(make(self.file, span, "error", code, message, hint))

    def warning(self, span: A.Span, code: str, message: str, hint: Optional[str] = None) -> None:
        self.diags.append(make(self.file, span, "warning", code, message, hint))


# ---------------------------------------------------------------- engines

def resolve_engines(rf: A.RulesFile, rep: Reporter) -> tuple[EngineSpec, ...]:
    """Every declaration as an EngineSpec with defaults resolved; problems go to the reporter."""
    specs: list[EngineSpec] = []
    first_line: dict[str, int] = {}
    for decl in rf.engines:
        key = decl.name.key
        if key in first_line:
            rep.error(decl.name.span, "duplicate-engine", f"engine '{key}' is already declared",
                      f"the first declaration is on line {first_line[key]}; engine names are case-insensitive")
            continue
        first_line[key] = decl.span.line
        spec = _resolve_engine(decl, rep)
        if spec is not None:
            specs.append(spec)
    if not rf.engines:
        rep.error(A.Span(1, 1, 1, 2), "no-engines", "the file declares no engines, so no mail could be delivered",
                  "declare at least one, e.g.: engine direct = direct")
    return tuple(specs)


def _resolve_engine(decl: A.EngineDecl, rep: Reporter) -> Optional[EngineSpec]:
    target = decl.target.text
    ok = True
    if target.lower() == "direct":
        kind, host, port = "direct", None, 25
    else:
        try:
            url = parse_engine_url(target)
        except ValueError as exc:
            rep.error(decl.target.span, "bad-value", str(exc))
            return None
        kind, host = url.kind, url.host
        port = url.port or (465 if kind == "smtps" else 25)
    opts: dict[str, A.Option] = {}
    unknown = False
    for opt in decl.options:
        if opt.key not in OPTIONS:
            unknown = True
            rep.error(opt.key_span, "unknown-option", f"engine option '{opt.key}' does not exist",
                      did_you_mean(opt.key, OPTIONS) or "options: " + ", ".join(OPTIONS))
            ok = False
        elif opt.key in opts:
            rep.error(opt.key_span, "duplicate-option", f"option '{opt.key}' is already given for this engine",
                      _where(opts[opt.key].span, opt.span))
            ok = False
        else:
            opts[opt.key] = opt

    values: dict[str, object] = {}

    def value(key: str, parse: Callable[[str], object], refs_ok: bool = False) -> None:
        nonlocal ok
        opt = opts.get(key)
        if opt is None:
            return
        if opt.is_ref and not refs_ok:
            rep.error(opt.value.span, "bad-value", f"'{opt.value.text}' is not a valid value for '{key}'",
                      'quote it: "…"' if key in ("user", "helo") else None)
            ok = False
            return
        try:
            values[key] = parse(opt.value.text)
        except ValueError as exc:
            rep.error(opt.value.span, "bad-value", f"{key}: {exc}")
            ok = False

    def nonempty(text: str) -> str:
        if not text:
            raise ValueError("must not be empty")
        return text

    def tls_value(text: str) -> str:
        low = text.lower()
        if low not in ("required", "opportunistic", "none"):
            raise ValueError(f"expected required, opportunistic or none, not '{text}'")
        return low

    def positive_duration(text: str) -> float:
        d = parse_duration(text)
        if d <= 0:
            raise ValueError("must be longer than 0s")
        return d

    def positive_size(text: str) -> int:
        n = parse_size(text)
        if n <= 0:
            raise ValueError("must be larger than 0")
        return n

    value("user", nonempty)
    value("helo", nonempty)
    value("tls", tls_value)
    value("verify", parse_bool)
    value("port", lambda t: parse_int(t, "the port", 1, 65535))
    value("timeout", positive_duration)
    value("connections", lambda t: parse_int(t, "connections", 1, 100000))
    value("max size", positive_size)

    password: Optional[SecretRef] = None
    popt = opts.get("password")
    if popt is not None:
        if popt.is_ref:
            try:
                k, v = parse_secret_ref(popt.value.text)
                password = SecretRef(k, v)  # type: ignore[arg-type]
                if k == "file":
                    _secret_file_mode(v, popt.value.span, rep)
            except ValueError as exc:
                rep.error(popt.value.span, "bad-value", str(exc))
                ok = False
        elif not popt.value.text:
            rep.error(popt.value.span, "bad-value", "the password is empty")
            ok = False
        else:
            password = SecretRef("literal", popt.value.text)
            rep.warning(popt.value.span, "literal-password", f"engine '{decl.name.key}' has its password written in the file",
                        "keep secrets out of the rules file: password env:VAR or password file:PATH")

    user = values.get("user")
    if kind == "direct":
        for key in ("user", "password", "tls"):
            if key in opts:
                rep.error(opts[key].key_span, "bad-value", f"'{key}' does not apply to direct delivery",
                          "direct delivery talks to each domain's MX hosts: no login, opportunistic TLS")
                ok = False
    else:
        if "port" in opts:
            rep.error(opts["port"].key_span, "bad-value", "'port' is for direct engines; a smarthost's port goes in its URL",
                      f"write: {kind}://{host}:{opts['port'].value.text}")
            ok = False
        if password is not None and user is None and not unknown:
            rep.error(popt.key_span, "bad-value", "a password needs a user", 'add: user "LOGIN"')  # type: ignore[union-attr]
            ok = False
        if user is not None and password is None and popt is None and not unknown:
            rep.error(opts["user"].key_span, "bad-value", "a user needs a password",
                      "add: password env:VAR (or file:PATH)")
            ok = False
    tls = values.get("tls")
    if kind == "smtps":
        if tls == "none":
            rep.error(opts["tls"].value.span, "bad-value", "smtps:// always uses TLS; 'tls none' cannot apply",
                      "use smtp:// for a server without TLS")
            ok = False
        tls = "implicit"
    elif kind == "smtp":
        if tls == "none" and user is not None:
            rep.error(opts["tls"].value.span, "password-in-clear",
                      f"engine '{decl.name.key}' would send its password without TLS",
                      "remove 'tls none' (the default with a user is 'tls required')")
            ok = False
        if tls is None:
            tls = "required" if user is not None else "opportunistic"
    else:
        tls = "opportunistic"
    if not ok:
        return None
    return EngineSpec(
        name=decl.name.key, kind=kind, host=host,  # type: ignore[arg-type]
        port=int(values.get("port", port)),  # type: ignore[arg-type]
        user=user,  # type: ignore[arg-type]
        password=password, tls=tls,  # type: ignore[arg-type]
        verify=bool(values.get("verify", kind != "direct")),
        helo=values.get("helo"),  # type: ignore[arg-type]
        timeout=float(values.get("timeout", 60.0)),  # type: ignore[arg-type]
        connections=int(values.get("connections", 10)),  # type: ignore[arg-type]
        max_size=values.get("max size"),  # type: ignore[arg-type]
        line=decl.span.line,
    )


def _where(first: A.Span, here: A.Span) -> str:
    if first.line == here.line:
        return f"it is first given at column {first.column}"
    return f"it is first given on line {first.line}"


def _secret_file_mode(path: str, span: A.Span, rep: Reporter) -> None:
    """Warn when a password file others may read; look at its mode only, never its content.
    A missing file is not reported here: `serve` refuses it, `check` cannot know the target machine."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if stat.S_ISREG(mode) and mode & 0o077:
        rep.warning(span, "secret-file-permissions",
                    f"the password file {path} can be read by others (mode {stat.S_IMODE(mode):04o})",
                    f"chmod 600 {path}")


# ---------------------------------------------------------------- rules and expectations

def check_names(names: tuple[A.Name, ...], known: dict[str, object], rep: Reporter) -> None:
    seen: set[str] = set()
    for n in names:
        if n.key not in known:
            rep.error(n.span, "unknown-engine", f"no engine named '{n.text}'",
                      did_you_mean(n.key, known) or ("declared engines: " + ", ".join(known) if known else None))
        elif n.key in seen:
            rep.error(n.span, "repeated-engine", f"engine '{n.key}' is named twice",
                      "each engine appears once in a plan")
        seen.add(n.key)


def atoms(cond: A.Condition) -> Iterable[A.Atom]:
    if isinstance(cond, (A.And, A.Or)):
        for c in cond.operands:
            yield from atoms(c)
    elif isinstance(cond, A.Not):
        yield from atoms(cond.operand)
    else:
        yield cond


def check_atom(atom: A.Atom, rep: Reporter) -> None:
    f = atom.field
    if f.name is None:
        head = f.written.split()[0].lower() if f.written else ""
        if head in LATER_FIELDS:
            rep.error(f.span, "unknown-field", f"the field '{head}' ({LATER_FIELDS[head]}) is not supported yet")
        else:
            rep.error(f.span, "unknown-field", f"'{f.written}' is not a field",
                      did_you_mean(f.written, A.FIELD_ALIASES) or "fields: destination, recipient, from, from domain, size, mx")
        return
    if isinstance(atom, A.Compare):
        if f.name != "size":
            rep.error(atom.span, "bad-operator", f"'is {atom.op} than' compares sizes; '{f.name}' is not a size",
                      "write e.g.: size is larger than 2000kb")
            return
        _size(atom.value, rep)
        return
    if f.name == "size":
        rep.error(atom.span, "bad-operator", "a size is tested with 'is larger than' or 'is smaller than'",
                  "write e.g.: size is larger than 2000kb")
        return
    if isinstance(atom, A.Matches):
        try:
            re.compile(atom.pattern.text, re.IGNORECASE)
        except (re.error, OverflowError, RecursionError) as exc:
            rep.error(atom.pattern.span, "bad-value", f"not a valid regular expression: {exc}")
        return
    for v in atom.values:
        _check_match_value(f.name, v, rep)


def _size(v: A.Value, rep: Reporter) -> Optional[int]:
    try:
        return parse_size(v.text)
    except ValueError as exc:
        rep.error(v.span, "bad-value", str(exc))
        return None


def _check_match_value(field: str, v: A.Value, rep: Reporter) -> None:
    text = v.text
    if field in DOMAIN_FIELDS:
        if "@" in text:
            rep.error(v.span, "bad-value", f"'{field}' is a domain, not an address: '{text}'",
                      "to match a whole address use 'recipient is …' or 'from is …'")
        elif not text.strip(". "):
            rep.error(v.span, "bad-value", f"'{field}' needs a domain name")
        elif re.search(r"\s", text):
            rep.error(v.span, "bad-value", f"a domain has no spaces: '{text}'")
    elif field == "recipient" and not text:
        rep.error(v.span, "bad-value", "a recipient is never empty", "the empty sender <> is tested with 'from is <>'")


MAX_DEPTH = 100


def depth(cond: A.Condition) -> int:
    """How deeply `not`, `and` and `or` nest (iteratively: the input may be absurd)."""
    deepest, todo = 0, [(cond, 1)]
    while todo:
        c, d = todo.pop()
        deepest = max(deepest, d)
        if isinstance(c, (A.And, A.Or)):
            todo.extend((o, d + 1) for o in c.operands)
        elif isinstance(c, A.Not):
            todo.append((c.operand, d + 1))
    return deepest


def check_statements(rf: A.RulesFile, known: dict[str, object], rep: Reporter) -> None:
    for rule in rf.rules:
        if depth(rule.condition) > MAX_DEPTH:
            rep.error(rule.condition.span, "syntax-error",
                      f"the condition nests 'not', 'and' and 'or' more than {MAX_DEPTH} deep",
                      "split it into several rules")
            continue
        for atom in atoms(rule.condition):
            check_atom(atom, rep)
        check_names(rule.action.engines, known, rep)
    for exp in rf.expects:
        if exp.to is None:
            rep.error(exp.span, "bad-value", "an expectation needs a recipient",
                      "write: expect mail to ADDRESS goes via ENGINE, …")
        elif not exp.to.text:
            rep.error(exp.to.span, "bad-value", "the recipient of an expectation is empty")
        for clause in exp.repeated:
            rep.error(exp.span, "bad-value", f"'{clause}' is given twice in one expectation")
        if exp.size is not None:
            _size(exp.size, rep)
        check_names(exp.engines, known, rep)


# ---------------------------------------------------------------- shadowed rules and rules with no effect

@dataclass
class _Cover:
    """What earlier rules already take, atom by atom (see shadowed())."""
    exact: dict[tuple[str, str], int]
    suffix: dict[tuple[str, str], int]
    larger: Optional[tuple[int, int]] = None    # (threshold, line): size > threshold
    smaller: Optional[tuple[int, int]] = None
    same: Optional[dict[A.Condition, int]] = None   # an atom or whole condition (structural equality) -> line


def _covering(cover: _Cover, cond: A.Condition) -> Optional[list[int]]:
    """The lines of earlier rules that together take every message `cond` takes, or None."""
    assert cover.same is not None
    line = cover.same.get(cond)
    if line is not None:
        return [line]
    if isinstance(cond, A.And):
        for op in cond.operands:
            got = _covering(cover, op)
            if got:
                return got
        return None
    if isinstance(cond, A.Or):
        out: list[int] = []
        for op in cond.operands:
            got = _covering(cover, op)
            if not got:
                return None
            out += got
        return out
    if isinstance(cond, A.Compare) and cond.field.name == "size":
        n = parse_size(cond.value.text)
        if cond.op == "larger" and cover.larger and n >= cover.larger[0]:
            return [cover.larger[1]]
        if cond.op == "smaller" and cover.smaller and n <= cover.smaller[0]:
            return [cover.smaller[1]]
        return None
    if isinstance(cond, A.Is) and not cond.negated and cond.field.name:
        f = cond.field.name
        out = []
        for v in cond.values:
            text = norm(f, v.text)
            line = cover.exact.get((f, text))
            if line is None and f in DOMAIN_FIELDS:
                wild = suffix_wildcard(text)
                probe = ([wild] + domain_suffixes(wild)) if wild else ([] if "*" in text else domain_suffixes(text))
                for s in probe:
                    line = cover.suffix.get((f, s))
                    if line is not None:
                        break
            if line is None:
                return None
            out.append(line)
        return out
    return None


def _register(cover: _Cover, cond: A.Condition, line: int) -> None:
    assert cover.same is not None
    cover.same.setdefault(cond, line)
    if isinstance(cond, A.Or):
        for op in cond.operands:
            _register(cover, op, line)
    elif isinstance(cond, A.Compare) and cond.field.name == "size":
        n = parse_size(cond.value.text)
        if cond.op == "larger" and (cover.larger is None or n < cover.larger[0]):
            cover.larger = (n, line)
        if cond.op == "smaller" and (cover.smaller is None or n > cover.smaller[0]):
            cover.smaller = (n, line)
    elif isinstance(cond, A.Is) and not cond.negated and cond.field.name:
        f = cond.field.name
        for v in cond.values:
            text = norm(f, v.text)
            cover.exact.setdefault((f, text), line)
            wild = suffix_wildcard(text) if f in DOMAIN_FIELDS else None
            if wild:
                cover.suffix.setdefault((f, wild), line)


def shadowed_and_no_effect(rf: A.RulesFile, order: tuple[str, ...], rep: Reporter) -> None:
    cover = _Cover({}, {}, same={})
    for rule in rf.rules:
        lines = _covering(cover, rule.condition)
        if lines:
            rep.warning(rule.span, "shadowed-rule",
                        f"this rule can never match: {_lines(lines)} already "
                        f"{'takes' if len(set(lines)) == 1 else 'take'} every message it would",
                        "move it above that rule, or remove it")
        elif plan_of(rule.action, order) == order:
            rep.warning(rule.action.span, "no-effect",
                        f"this rule's plan is the default order ({', '.join(order)}), so it changes nothing",
                        "it still stops later rules from deciding for the mail it takes")
        _register(cover, rule.condition, rule.span.line)


def plan_of(action: A.Action, order: tuple[str, ...]) -> tuple[str, ...]:
    named = tuple(dict.fromkeys(n.key for n in action.engines))
    if action.mode == "only":
        return named
    return named + tuple(e for e in order if e not in named)


def run_expects(rf: A.RulesFile, table: "object", rep: Reporter) -> None:
    """Evaluate every `expect` against the compiled table."""
    for exp in rf.expects:
        assert exp.to is not None
        size = parse_size(exp.size.text) if exp.size is not None else 0
        decision = table.plan(exp.to.text, exp.sender.text if exp.sender else "", size,  # type: ignore[attr-defined]
                              tuple(v.text for v in exp.mx))
        want = tuple(n.key for n in exp.engines)
        if decision.engines != want:
            why = (f"decided by line {decision.rule.line}: {decision.rule.text}" if decision.rule
                   else "no rule matched: the plan is the declared engine order")
            rep.error(exp.span, "expect-failed",
                      f"mail to {exp.to.text}: expected {', '.join(want)}; "
                      f"the rules give {', '.join(decision.engines)}",
                      why)
