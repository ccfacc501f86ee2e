"""The README's examples are real: its rules file passes `check` and routes as it says."""
from __future__ import annotations

from pathlib import Path

import routedsl

README = Path(__file__).resolve().parents[2] / "README.md"


def block_after(header: str) -> str:
    """The indented block that follows `header` in the README (Postfix-README style)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(header) + 1
    while not lines[start].strip():
        start += 1
    indent = len(lines[start]) - len(lines[start].lstrip())
    block = []
    for line in lines[start:]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        block.append(line[indent:])
    return "\n".join(block).strip() + "\n"


def test_the_readme_rules_file_passes_check_without_errors():
    text = block_after("    /etc/routedsl/routes.rules:")
    errors = [d for d in routedsl.check_text(text, "routes.rules") if d.severity == "error"]
    assert errors == []


def test_the_readme_route_example_is_what_the_table_answers():
    table = routedsl.compile_text(block_after("    /etc/routedsl/routes.rules:"), "routes.rules")
    decision = table.plan("friend@aol.com", sender="me@home.net", size=3_000_000)
    # README: friend@aol.com: somehost → isp → direct → provider   (routes.rules:6  if destination is aol.com ...)
    assert decision.engines == ("somehost", "isp", "direct", "provider")
    assert decision.rule is not None and decision.rule.line == 6
    assert decision.rule.text == "if destination is aol.com then try somehost first"


def test_the_manual_wording_quoted_in_the_readme_is_valid():
    rule = block_after("mean the same as their short forms:")
    engines = "engine smtp.somehost.com = smtps://smtp.somehost.com\nengine direct = direct\n"
    errors = [d for d in routedsl.check_text(engines + rule, "routes.rules")
              if d.severity == "error"]
    assert errors == []
