"""The library's entry points: text -> diagnostics, text -> RouteTable, file -> RouteTable.

Owns the order of the stages (parse, resolve engines, check names and values, compile,
shadowing and no-effect warnings, expectations), the one decoding of a file's bytes,
and RulesError. A file with any error never becomes a table. check_text never raises on
bad text; reading a file is the caller's business except in load().
"""
from __future__ import annotations

import gc
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

from routedsl import ast as A
from routedsl import lint
from routedsl.compile import build_table
from routedsl.diagnostics import Diagnostic, make, render_human, sort_key
from routedsl.syntax import parse
from routedsl.table import EngineSpec, RouteTable


MAX_DIAGNOSTICS = 100


class RulesError(Exception):
    """A rules file that does not pass `check`; .diagnostics holds every problem found."""

    def __init__(self, diagnostics: list[Diagnostic], text: str = "") -> None:
        self.diagnostics = diagnostics
        self.text = text
        errors = [d for d in diagnostics if d.is_error]
        first = errors[0] if errors else (diagnostics[0] if diagnostics else None)
        head = f"{first.file}:{first.line}:{first.column}: {first.code}: {first.message}" if first else "invalid rules"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(head + more)

    def render(self) -> str:
        return render_human(self.diagnostics, self.text)


def analyse(text: str, filename: str = "routes.rules", *,
            strict: bool = False) -> tuple[Optional[RouteTable], list[Diagnostic], Optional[A.RulesFile]]:
    """Every stage; returns the table (None when there are errors), the diagnostics and the AST."""
    # The stages allocate many small objects that all stay alive; cyclic GC passes over
    # them would nearly double the time of a large file, and find nothing to free.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _analyse(text, filename, strict)
    finally:
        if was_enabled:
            gc.enable()


def _analyse(text: str, filename: str,
             strict: bool) -> tuple[Optional[RouteTable], list[Diagnostic], Optional[A.RulesFile]]:
    try:
        rf, diags = parse(text, filename)
        if rf is None:
            return None, diags, None
        rep = lint.Reporter(filename)
        engines = lint.resolve_engines(rf, rep)
        known: dict[str, object] = {d.name.key: d for d in rf.engines}
        lint.check_statements(rf, known, rep)
        table = None
        if not any(d.is_error for d in rep.diags):
            table = build_table(rf, engines, text, filename)
            lint.shadowed_and_no_effect(rf, table.engine_names, rep)
            lint.run_expects(rf, table, rep)
        diags = sorted(rep.diags, key=sort_key)
    except RecursionError:
        return None, [make(filename, A.Span(1, 1, 1, 2), "error", "syntax-error",
                           "the conditions are nested too deeply")], None
    if len(diags) > MAX_DIAGNOSTICS:
        rest = diags[MAX_DIAGNOSTICS]
        more = len(diags) - MAX_DIAGNOSTICS
        diags = diags[:MAX_DIAGNOSTICS] + [replace(
            rest, severity="error" if any(d.is_error for d in diags) else "warning",
            code="too-many-problems", message=f"{more} more problem{'s' if more != 1 else ''} not shown",
            hint="fix the ones above and check again")]
    if strict:
        diags = [d if d.is_error else replace(d, severity="error") for d in diags]
    if any(d.is_error for d in diags):
        return None, diags, rf
    return table, diags, rf


def check_text(text: str, filename: str = "routes.rules") -> list[Diagnostic]:
    """Every problem in the text, errors and warnings, in file order. Never raises."""
    return analyse(text, filename)[1]


def compile_text(text: str, filename: str = "routes.rules") -> RouteTable:
    """The compiled table; raises RulesError (with .diagnostics) when the text has errors."""
    table, diags, _ = analyse(text, filename)
    if table is None:
        raise RulesError(diags, text)
    return table


def decode(data: bytes, filename: str) -> str:
    """The file's bytes as text (UTF-8, BOM allowed); RulesError with a bad-encoding
    diagnostic (and the text with bad bytes replaced, to show it) when they are not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        col = len(before[before.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
        diag = make(filename, A.Span(line, col, line, col + 1), "error", "bad-encoding",
                    f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line})",
                    "save the file as UTF-8")
        raise RulesError([diag], data.decode("utf-8", "replace")) from None


def load(path: Union[str, "os.PathLike[str]"]) -> RouteTable:
    """Read and compile a rules file. Raises RulesError when invalid, OSError when unreadable."""
    return compile_text(decode(Path(path).read_bytes(), str(path)), str(path))


__all__ = ["RulesError", "analyse", "check_text", "compile_text", "decode", "load", "EngineSpec"]
