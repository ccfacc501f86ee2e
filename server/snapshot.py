"""The routing state the relay acts on: one compiled table and the engines it names.

A Snapshot is immutable. A reload builds a new one off to the side and swaps the one
reference the scheduler reads; an attempt in flight keeps the Snapshot it started with.

This module owns turning rules text into a Snapshot: compile (through `routedsl`),
resolve every engine's secret, and build the engine set, reusing the engines of the
previous Snapshot whose declaration and secret are unchanged (their pooled connections
stay warm). It never reads the rules file, never watches anything and never closes an
engine: the caller retires what `retired_engines()` names.

Diagnostics: a file that fails `check`, or names a secret that cannot be read, raises
`ReloadRefused` whose `.text` is rendered exactly as `routedsl check` renders it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    from routedsl import RouteTable
    from routedsl.table import EngineSpec
    from server.engines.base import Engine, EngineContext

log = logging.getLogger("routedsl.snapshot")


@dataclass(frozen=True)
class Snapshot:
    table: "RouteTable"
    engines: "Mapping[str, Engine]"
    version: str
    loaded_at: float
    # Per engine name: a digest of (declaration, secret) used to decide reuse on the
    # next reload. Never the secret itself; not part of equality or repr.
    engine_keys: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)


class ReloadRefused(Exception):
    """The rules text cannot become the active Snapshot.

    `.text` is the human rendering (the same as `routedsl check`), `.diagnostics` the
    Diagnostic values behind it (empty when the problem is not tied to a position).
    """

    def __init__(self, text: str, diagnostics: tuple[Any, ...] = ()) -> None:
        super().__init__(text)
        self.text = text
        self.diagnostics = diagnostics


@dataclass(frozen=True)
class Prepared:
    """A compiled table with every secret resolved: all that can fail, done off the loop."""
    table: "RouteTable"
    secrets: Mapping[str, Optional[str]] = field(repr=False)


def prepare(text: str, filename: str) -> Prepared:
    """Compile `text` and resolve its secrets; blocking (secret files), so run it in a thread.

    Raises ReloadRefused with the rendered diagnostics on any error.
    """
    import routedsl
    from server.secrets import SecretError, resolve_secret

    try:
        table = routedsl.compile_text(text, filename)
    except routedsl.RulesError as exc:
        diags = tuple(exc.diagnostics)
        raise ReloadRefused(routedsl.render_human(list(diags), text), diags) from None
    secrets: dict[str, Optional[str]] = {}
    problems = []
    for spec in table.engines:
        try:
            secrets[spec.name] = resolve_secret(spec.password)
        except SecretError as exc:
            problems.append(_secret_diagnostic(text, filename, spec, str(exc)))
    if problems:
        raise ReloadRefused(routedsl.render_human(problems, text), tuple(problems))
    return Prepared(table, secrets)


def assemble(prepared: Prepared, ctx: "EngineContext",
             previous: Optional[Snapshot] = None) -> Snapshot:
    """Build the engine set for `prepared`, reusing unchanged engines of `previous`.

    Call it on the event loop thread (engines may create loop-bound objects).
    """
    from server.engines.base import build_engine
    engines: dict[str, Engine] = {}
    keys: dict[str, str] = {}
    reused = 0
    for spec in prepared.table.engines:
        secret = prepared.secrets.get(spec.name)
        key = engine_key(spec, secret)
        keys[spec.name] = key
        if previous is not None and previous.engine_keys.get(spec.name) == key \
                and spec.name in previous.engines:
            engines[spec.name] = previous.engines[spec.name]
            reused += 1
        else:
            try:
                engines[spec.name] = build_engine(spec, secret, ctx)
            except (OSError, ValueError) as exc:   # e.g. an unreadable CA file
                # Engines built so far have opened nothing yet: dropping them is enough.
                raise ReloadRefused(f"{prepared.table.source}:{spec.line}: engine "
                                    f"'{spec.name}' cannot be set up: {exc}") from None
    log.debug("engines: %d reused, %d new", reused, len(engines) - reused)
    return Snapshot(table=prepared.table, engines=engines, version=prepared.table.version,
                    loaded_at=time.time(), engine_keys=keys)


def decode_rules(data: bytes, filename: str) -> str:
    """The rules text of a file's bytes, decoded exactly as `routedsl check` decodes them.

    Raises ReloadRefused (code `bad-encoding`, at the first bad byte) when they are not UTF-8.
    """
    import routedsl
    from routedsl.api import decode

    try:
        return decode(data, filename)
    except routedsl.RulesError as exc:
        raise ReloadRefused(exc.render(), tuple(exc.diagnostics)) from None


def build_snapshot(
    text: str,
    filename: str,
    ctx: "EngineContext",
    previous: Optional[Snapshot] = None,
) -> Snapshot:
    """Compile, resolve secrets and build engines in one call (the start-up path).

    Raises ReloadRefused (with rendered diagnostics) when the text fails check or a
    secret is missing; nothing is built in that case.
    """
    return assemble(prepare(text, filename), ctx, previous)


def retired_engines(old: Optional[Snapshot], new: Snapshot) -> list["Engine"]:
    """Engines of `old` that `new` does not reuse: the caller must `aclose()` them."""
    if old is None:
        return []
    kept = {id(engine) for engine in new.engines.values()}
    return [engine for engine in old.engines.values() if id(engine) not in kept]


def engine_key(spec: "EngineSpec", secret: Optional[str]) -> str:
    """A digest of everything that makes an engine what it is (not where it is declared)."""
    digest = hashlib.sha256(repr(dataclasses.replace(spec, line=0)).encode("utf-8"))
    digest.update(b"\0secret\0")
    digest.update(b"-" if secret is None else b"+" + secret.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _secret_diagnostic(text: str, filename: str, spec: "EngineSpec", message: str) -> Any:
    """A `missing-secret` error at the engine's password (or its declaration line)."""
    from routedsl import Diagnostic

    line, column, end_column = _locate_password(text, spec)
    return Diagnostic(
        file=filename, line=line, column=column, end_line=line, end_column=end_column,
        severity="error", code="missing-secret",
        message=f"engine '{spec.name}': {message}",
        hint=_secret_hint(spec),
    )


def _secret_hint(spec: "EngineSpec") -> str:
    ref = spec.password
    if ref is not None and ref.kind == "env":
        return (f"set {ref.value} in the environment the relay starts with "
                f"(a running relay cannot see a new variable)")
    if ref is not None and ref.kind == "file":
        return "create the file, readable by the relay, then save the rules or send SIGHUP"
    return "check the engine's password"


def _locate_password(text: str, spec: "EngineSpec") -> tuple[int, int, int]:
    """Where the engine's `password env:/file:` reference is written (1-based line, columns).

    An engine declaration may continue over several lines; look a few lines on from its
    declaration line. Falls back to the whole declaration line.
    """
    lines = text.splitlines()
    start = max(spec.line, 1)
    ref = spec.password
    if ref is not None:
        pattern = re.compile(rf"{re.escape(ref.kind)}\s*:\s*\"?{re.escape(ref.value)}\"?")
        for number in range(start, min(start + 5, len(lines)) + 1):
            found = pattern.search(lines[number - 1])
            if found:
                return number, found.start() + 1, found.end() + 1
    current = lines[start - 1] if 0 < start <= len(lines) else ""
    indent = len(current) - len(current.lstrip())
    return start, indent + 1, max(len(current.rstrip()), indent) + 1
