"""Diagnostics: the one shape of every problem found in a routes file, and its renderers.

Owns the Diagnostic value and the two renderings: human (`file:line:col: error[code]:
message`, the source line, an underline and a hint, like a compiler) and JSON. The relay
logs a refused reload with render_human, so `check` and the logs read the same. Never
decides what is a problem (lint.py and syntax.py do).
"""
from __future__ import annotations

import functools
import json
import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Iterable, Literal, Optional

from routedsl.ast import Span

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Diagnostic:
    file: str
    line: int
    column: int
    end_line: int
    end_column: int          # exclusive
    severity: Severity
    code: str
    message: str
    hint: Optional[str] = None

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def make(file: str, span: Span, severity: Severity, code: str, message: str,
         hint: Optional[str] = None) -> Diagnostic:
    return Diagnostic(file, span.line, span.column, span.end_line, span.end_column,
                      severity, code, message, hint)


def did_you_mean(word: str, choices: Iterable[str]) -> Optional[str]:
    """A hint naming the closest choice, if one is close enough (case-insensitive)."""
    return _did_you_mean(word.lower(), tuple(choices))


@functools.lru_cache(maxsize=1024)
def _did_you_mean(word: str, choices: tuple[str, ...]) -> Optional[str]:
    import difflib  # only when a file has a mistake: the relay never needs it otherwise
    best = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean '{best[0]}'?" if best else None


def normalize_text(text: str) -> str:
    """The text as the parser sees it: no BOM, every line ending a single \\n."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str, limit: int = 60) -> str:
    """Text from the file made safe to print in one line: controls shown as '?', long text cut."""
    text = _CONTROL.sub("?", text.replace("\n", "?"))
    text = "".join("?" if unicodedata.category(c) in ("Cs", "Co", "Cn") else c for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_WINDOW = 160


def _excerpt(src: str, col: int, end_col: int) -> tuple[str, str]:
    """The source line (windowed when long) and its underline."""
    start = 0
    if len(src) > _WINDOW:
        start = max(0, min(col - 1 - _WINDOW // 3, len(src) - _WINDOW))
        shown = src[start:start + _WINDOW]
        lead, tail = ("…" if start else ""), ("…" if start + _WINDOW < len(src) else "")
        src_shown = lead + _CONTROL.sub("?", shown) + tail
        offset = len(lead)
    else:
        src_shown, offset = _CONTROL.sub("?", src), 0
    first = max(col - 1 - start, 0)
    width = max(1, min(end_col - col, len(src) - (col - 1)) if end_col > col else 1)
    width = min(width, max(1, _WINDOW - first))
    prefix = "".join("\t" if c == "\t" else " " for c in src[start:start + first])
    return src_shown, " " * offset + prefix + "^" * width


def render_one(d: Diagnostic, lines: list[str]) -> str:
    out = [f"{d.file}:{d.line}:{d.column}: {d.severity}[{d.code}]: {d.message}"]
    if 1 <= d.line <= len(lines):
        src = lines[d.line - 1]
        end_col = d.end_column if d.end_line == d.line else len(src) + 1
        shown, underline = _excerpt(src, d.column, end_col)
        gutter = f"{d.line:>4}"
        out.append(f"{gutter} | {shown}".rstrip())
        out.append(f"{' ' * len(gutter)} | {underline}")
    if d.hint:
        hint_lines = d.hint.split("\n")
        out.append(f"     = hint: {hint_lines[0]}")
        out.extend(f"             {h}" for h in hint_lines[1:])
    return "\n".join(out)


def summary(diagnostics: Iterable[Diagnostic]) -> str:
    diags = list(diagnostics)
    errors = sum(d.is_error for d in diags)
    warnings = len(diags) - errors
    parts = []
    if errors:
        parts.append(f"{errors} error" + ("s" if errors != 1 else ""))
    if warnings:
        parts.append(f"{warnings} warning" + ("s" if warnings != 1 else ""))
    return " and ".join(parts) or "no problems"


def render_human(diagnostics: Iterable[Diagnostic], text: str) -> str:
    """Every diagnostic with its source line and underline, then a count; '' when there are none."""
    diags = list(diagnostics)
    if not diags:
        return ""
    lines = normalize_text(text).split("\n")
    blocks = [render_one(d, lines) for d in diags]
    files = sorted({d.file for d in diags})
    blocks.append(f"{', '.join(files)}: {summary(diags)}")
    return "\n".join(blocks) + "\n"


def render_json(diagnostics: Iterable[Diagnostic]) -> str:
    return json.dumps([d.to_json() for d in diagnostics], indent=2, ensure_ascii=False) + "\n"


def sort_key(d: Diagnostic) -> tuple[int, int, str]:
    return (d.line, d.column, d.code)
