"""The example routes.rules at the top of the project passes check and says what it shows."""
from pathlib import Path

import routedsl
from routedsl.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "routes.rules"


def test_example_file_is_valid_and_counts_are_reported(capsys):
    assert main(["check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines() == [f"{EXAMPLE}: OK (4 engines, 8 rules, 9 expectations)"]


def test_example_file_loads_with_every_default_resolved():
    table = routedsl.load(EXAMPLE)
    assert [e.name for e in table.engines] == ["direct", "isp", "somehost", "provider"]
    isp = table.engine("ISP")
    assert (isp.kind, isp.host, isp.port, isp.tls, isp.verify) == ("smtp", "smtp.someisp.com", 587, "required", True)
    assert isp.password == routedsl.SecretRef("env", "ISP_PASSWORD")
    somehost = table.engine("somehost")
    assert (somehost.port, somehost.tls, somehost.timeout, somehost.max_size) == (465, "implicit", 30.0, 25_000_000)
    direct = table.engine("direct")
    assert (direct.port, direct.tls, direct.verify, direct.connections, direct.helo) == (25, "opportunistic", False, 20, "mail.home.net")
    assert table.needs_mx
    assert len(table.version) == 12


def test_rules_error_renders_exactly_like_check(tmp_path, capsys):
    bad = tmp_path / "routes.rules"
    bad.write_text(EXAMPLE.read_text().replace("first:[somehost]", "first:[somehst]"))
    assert main(["check", str(bad)]) == 1
    printed = capsys.readouterr().out
    try:
        routedsl.load(bad)
    except routedsl.RulesError as exc:
        assert routedsl.render_human(exc.diagnostics, bad.read_text()) == printed == exc.render()
        assert [d.code for d in exc.diagnostics] == ["unknown-engine"]
        assert "did you mean 'somehost'?" in printed
    else:
        raise AssertionError("load accepted an invalid file")


def test_load_refuses_a_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "routes.rules"
    p.write_bytes(b"engine direct = direct\n# caf\xe9\n")
    try:
        routedsl.load(p)
    except routedsl.RulesError as exc:
        (d,) = exc.diagnostics
        assert (d.code, d.line, d.column) == ("bad-encoding", 2, 6)
    else:
        raise AssertionError("load accepted latin-1")


def test_the_spec_example_and_its_expectations_pass(capsys):
    """The contract's §1 file with its §4 expectations: valid; its size rule names the first engine."""
    spec = Path(__file__).parent / "files" / "spec-section-1.rules"
    assert main(["check", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "warning[no-effect]" in out and out.endswith("OK (4 engines, 3 rules, 2 expectations)\n")
