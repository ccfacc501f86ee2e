"""One golden case per diagnostic: cases/NAME.rules checked must print exactly cases/NAME.expected.

To add a case: write NAME.rules, run `routedsl check NAME.rules > NAME.expected` inside
cases/, read the output, keep it if it is what a user should see.
"""
import json
from pathlib import Path

import pytest

from routedsl.cli import main

CASES = Path(__file__).parent / "cases"
NAMES = sorted(p.stem for p in CASES.glob("*.rules"))
CODES = {
    "syntax-error", "unknown-engine", "duplicate-engine", "unknown-option", "bad-value", "password-in-clear",
    "repeated-engine", "no-engines", "expect-failed", "shadowed-rule", "no-effect", "literal-password",
    "unknown-field", "bad-operator", "duplicate-option", "bad-encoding",
}


@pytest.mark.parametrize("name", NAMES)
def test_human_output_is_exactly_the_golden_file(name, capsys, monkeypatch):
    monkeypatch.chdir(CASES)
    expected = (CASES / f"{name}.expected").read_text(encoding="utf-8")
    code = main(["check", f"{name}.rules"])
    assert capsys.readouterr().out == expected
    assert code == (1 if "error[" in expected else 0)


@pytest.mark.parametrize("name", NAMES)
def test_json_output_has_the_same_diagnostics(name, capsys, monkeypatch):
    monkeypatch.chdir(CASES)
    expected = (CASES / f"{name}.expected").read_text(encoding="utf-8")
    code = main(["check", "--format", "json", f"{name}.rules"])
    diags = json.loads(capsys.readouterr().out)
    assert code == (1 if "error[" in expected else 0)
    assert [f"{d['file']}:{d['line']}:{d['column']}: {d['severity']}[{d['code']}]: {d['message']}" for d in diags] \
        == [line for line in expected.splitlines() if "]: " in line and line.startswith(f"{name}.rules:")]
    for d in diags:
        assert set(d) == {"file", "line", "column", "end_line", "end_column", "severity", "code", "message", "hint"}
        assert (d["end_line"], d["end_column"]) > (d["line"], d["column"])


def test_every_diagnostic_code_has_a_golden_case():
    seen = set()
    for name in NAMES:
        text = (CASES / f"{name}.expected").read_text(encoding="utf-8")
        seen |= {code for code in CODES if f"[{code}]" in text}
    assert seen == CODES


def test_strict_turns_warnings_into_errors(capsys, monkeypatch):
    monkeypatch.chdir(CASES)
    assert main(["check", "no-effect.rules"]) == 0
    assert main(["check", "--strict", "no-effect.rules"]) == 1
    out = capsys.readouterr().out
    assert "error[no-effect]" in out and "OK" not in out.splitlines()[-1]


def test_a_password_file_others_can_read_is_warned_about(tmp_path):
    import routedsl
    pw = tmp_path / "isp.pw"
    pw.write_text("secret\n")
    text = f'engine isp = smtp://smtp.someisp.com:587 user "me" password file:{pw}\n'
    pw.chmod(0o644)
    (d,) = routedsl.check_text(text)
    assert (d.severity, d.code, d.column) == ("warning", "secret-file-permissions", text.index("file:") + 1)
    assert "mode 0644" in d.message and d.hint == f"chmod 600 {pw}"
    pw.chmod(0o600)
    assert routedsl.check_text(text) == []
    pw.unlink()                     # check reads no secrets: a missing file is serve's business
    assert routedsl.check_text(text) == []
