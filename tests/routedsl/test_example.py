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
