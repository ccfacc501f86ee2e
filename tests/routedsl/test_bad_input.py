"""Any file, however broken, gets diagnostics (exit 1), never a traceback."""
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import routedsl
from routedsl.cli import main

EXAMPLE = (Path(__file__).resolve().parents[2] / "routes.rules").read_text(encoding="utf-8")
RULE = "engine isp = smtp://smtp.someisp.com\nengine direct = direct\nif destination is aol.com then try direct first\n"

BROKEN = {
    "empty": b"",
    "binary-garbage": bytes(range(256)) * 4,
    "nul-bytes": b"engine isp = direct\x00\nif\x00\n",
    "one-megabyte-line": b"engine isp = direct\nif destination is " + b"a" * 1_000_000 + b" then\n",
    "many-words-on-one-line": b"engine isp = direct " + b"x " * 20_000 + b"\n",
    "unbalanced-open": b"engine isp = direct\nif ((destination is a.com then try isp first\n",
    "unbalanced-close": b"engine isp = direct\nif destination is a.com) then try isp first\n",
    "unknown-keyword": b"engine isp = direct\nroute aol.com via isp\n",
    "trailing-backslash": b"engine isp = direct\nif destination is a.com then try isp first \\",
    "unterminated-string": b'engine isp = smtp://h user "me\nif x\n',
    "only-a-bom": b"\xef\xbb\xbf",
    "latin-1": "engine isp = direct # caf\u00e9\n".encode("latin-1"),
    "deep-not": b"engine isp = direct\nif " + b"not " * 5000 + b"destination is a.com then try isp first\n",
    "rule-without-then": b"engine isp = direct\nif destination is a.com\nif destination is b.com then try isp first\n",
    "many-errors": b"engine isp = direct\n" + b"if if if\n" * 50,
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_file_gets_diagnostics_and_exit_1(name, tmp_path, capsys):
    path = tmp_path / "routes.rules"
    path.write_bytes(BROKEN[name])
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr()
    assert "error[" in out.out and "Traceback" not in out.out + out.err
    assert all(len(line) < 400 for line in out.out.splitlines())     # long lines are shown as an excerpt
    assert main(["check", "--format", "json", str(path)]) == 1


def test_deep_parentheses_are_just_grouping():
    text = "engine isp = direct\nif " + "(" * 5000 + "destination is a.com" + ")" * 5000 + " then use only isp\n"
    assert routedsl.compile_text(text).plan("x@a.com").rule.text == "if destination is a.com then use only isp"


def test_crlf_tabs_and_a_bom_are_fine(tmp_path, capsys):
    text = "\ufeff" + EXAMPLE.replace("  ", "\t").replace("\n", "\r\n")
    path = tmp_path / "routes.rules"
    path.write_bytes(text.encode("utf-8"))
    assert main(["check", str(path)]) == 0, capsys.readouterr().out
    assert routedsl.compile_text(text).rule_count == routedsl.compile_text(EXAMPLE).rule_count


def test_an_error_line_with_tabs_is_underlined_under_the_right_characters():
    text = "engine isp = direct\nif\tdestination is a.com then\ttry ips first\n"
    out = routedsl.render_human(routedsl.check_text(text), text)
    src, underline = out.splitlines()[1:3]
    assert src.endswith("if\tdestination is a.com then\ttry ips first")
    before = "if\tdestination is a.com then\ttry "
    assert underline.split("| ", 1)[1] == "".join("\t" if c == "\t" else " " for c in before) + "^^^"


def test_several_syntax_errors_are_reported_in_one_run():
    text = "engine isp = direct\nif destination is then try isp first\nengine = direct\nexpect mail goes\n"
    codes = [(d.code, d.line) for d in routedsl.check_text(text)]
    assert codes == [("syntax-error", 2), ("syntax-error", 3), ("syntax-error", 4)]


def test_rule_without_then_is_reported_on_its_own_line():
    text = BROKEN["rule-without-then"].decode()
    (d,) = routedsl.check_text(text)
    assert (d.line, d.code) == (2, "syntax-error") and "then" in d.message


def _mutate(text: str, edits: list[tuple[int, int, str]]) -> str:
    for pos, kind, ch in edits:
        pos %= max(len(text), 1)
        if kind == 0:
            text = text[:pos] + ch + text[pos:]
        elif kind == 1:
            text = text[:pos] + text[pos + 1:]
        else:
            text = text[:pos] + ch + text[pos + 1:]
    return text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_random_text_never_raises(text):
    diags = routedsl.check_text(text)
    routedsl.render_human(diags, text)
    routedsl.render_json(diags)


special = st.sampled_from(list('()<>[]:,="\\#\n\r\t *@.') + ["\x00", "\ufeff", "é", "if ", " then ", " not "])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2), st.one_of(special, st.characters())),
                min_size=1, max_size=6))
def test_mutations_of_the_example_never_raise(edits):
    text = _mutate(EXAMPLE, edits)
    diags = routedsl.check_text(text)
    assert all(d.line >= 1 and d.column >= 1 for d in diags)
    rendered = routedsl.render_human(diags, text)
    assert ("error[" in rendered) == any(d.is_error for d in diags)
    try:
        routedsl.compile_text(text)
    except routedsl.RulesError as exc:
        assert exc.diagnostics


def test_check_reads_standard_input(monkeypatch, capsys):
    import io
    import sys
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(RULE.encode())))
    assert main(["check", "-"]) == 0
    assert capsys.readouterr().out.strip() == "<stdin>: OK (2 engines, 1 rule, 0 expectations)"


def test_unreadable_file_is_a_usage_error(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing.rules")]) == 2
    assert "cannot read" in capsys.readouterr().err
    if os.geteuid() != 0:
        p = tmp_path / "locked.rules"
        p.write_text(RULE)
        p.chmod(0)
        assert main(["check", str(p)]) == 2
