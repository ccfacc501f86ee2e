"""`routedsl check` and `routedsl route`: exit codes, output formats, MX look-ups, imports."""
import json
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from routedsl.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "routes.rules"


def test_route_prints_the_plan_and_the_deciding_rule(capsys):
    code = main(["route", str(EXAMPLE), "--to", "friend@aol.com", "--from", "me@home.net", "--size", "3mb"])
    assert code == 0
    assert capsys.readouterr().out == (
        f"friend@aol.com: somehost → direct → isp → provider   ({EXAMPLE}:30  if destination is aol.com then try somehost first)\n")


def test_route_json_and_the_default_order(capsys):
    assert main(["route", str(EXAMPLE), "--to", "a@example.com", "--from", "me@home.net", "--mx", "mx.example.com",
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "recipient": "a@example.com", "plan": ["direct", "isp", "somehost", "provider"], "rule": None}
    assert main(["route", str(EXAMPLE), "--to", "a@example.com", "--from", "me@home.net", "--mx", "x.y"]) == 0
    assert "(no rule matched: the declared order)" in capsys.readouterr().out


def test_route_with_given_mx_hosts(capsys):
    assert main(["route", str(EXAMPLE), "--to", "a@contoso.com", "--from", "me@home.net",
                 "--mx", "contoso-com.mail.protection.outlook.com", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"] == ["isp"] and out["rule"]["text"] == "if mx is *.mail.protection.outlook.com then use only isp"


class MxServer:
    """A dnspython-built DNS server on 127.0.0.1 (UDP, port 0): MX answers for the given zones, NXDOMAIN else."""

    def __init__(self, mx: dict[str, list[tuple[int, str]]]) -> None:
        self.mx = mx
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.queries: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            query = dns.message.from_wire(data)
            name = query.question[0].name.to_text().rstrip(".").lower()
            self.queries.append(name)
            reply = dns.message.make_response(query)
            if name in self.mx and query.question[0].rdtype == dns.rdatatype.MX:
                reply.answer.append(dns.rrset.from_text(
                    name + ".", 0, "IN", "MX", *[f"{pref} {host}." for pref, host in self.mx[name]]))
            elif name not in self.mx:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(reply.to_wire(), peer)

    def __enter__(self) -> "MxServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def test_route_looks_mx_hosts_up_for_mx_rules(capsys):
    zones = {"contoso.com": [(20, "backup.contoso.com"), (10, "contoso-com.mail.protection.outlook.com")]}
    with MxServer(zones) as dns_server:
        code = main(["route", str(EXAMPLE), "--to", "a@contoso.com", "--from", "me@home.net",
                     "--nameserver", f"127.0.0.1:{dns_server.port}", "--format", "json"])
        assert code == 0
        assert json.loads(capsys.readouterr().out)["plan"] == ["isp"]
        assert dns_server.queries == ["contoso.com"]
        # a domain without MX: a note on stderr, and the rules decide as if it had no MX hosts
        assert main(["route", str(EXAMPLE), "--to", "a@nowhere.example", "--from", "me@home.net",
                     "--nameserver", f"127.0.0.1:{dns_server.port}"]) == 0
        out = capsys.readouterr()
        assert "no MX hosts for nowhere.example" in out.err
        assert out.out.startswith("a@nowhere.example: direct → isp → somehost → provider")


def test_route_without_mx_rules_asks_no_dns(tmp_path, capsys):
    rules = tmp_path / "r.rules"
    rules.write_text("engine direct = direct\nengine isp = smtp://h.example\n")
    with MxServer({}) as dns_server:
        assert main(["route", str(rules), "--to", "a@b.example", "--nameserver", f"127.0.0.1:{dns_server.port}"]) == 0
        assert dns_server.queries == []


def test_route_refuses_an_invalid_file(tmp_path, capsys):
    rules = tmp_path / "r.rules"
    rules.write_text("engine direct = direct\nif destination is a.com then try dirct first\n")
    assert main(["route", str(rules), "--to", "a@a.com"]) == 1
    assert "error[unknown-engine]" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    [], ["check"], ["route", "x.rules"], ["route", "x.rules", "--to", "a@b", "--size", "3 parsecs"],
    ["check", "--format", "xml", "x.rules"], ["frobnicate"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2


def test_relay_commands_are_handed_to_server_cli(monkeypatch):
    seen = []
    fake = types.ModuleType("server.cli")
    fake.main = lambda argv: seen.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "server.cli", fake)
    assert main(["serve", "routes.rules", "--listen", "127.0.0.1:0"]) == 0
    assert main(["queue", "list", "--spool", "s"]) == 0
    assert seen == [["serve", "routes.rules", "--listen", "127.0.0.1:0"], ["queue", "list", "--spool", "s"]]


def test_relay_commands_without_the_relay_say_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "server.cli", None)
    assert main(["status"]) == 2
    assert "needs the relay" in capsys.readouterr().err


def test_check_imports_no_network_library():
    code = (
        "import sys\n"
        "from routedsl.cli import main\n"
        f"rc = main(['check', {str(EXAMPLE)!r}])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('aiosmtpd', 'aiosmtplib', 'dns', 'watchfiles', 'server', 'asyncio'))\n"
        "print('IMPORTED', heavy)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stdout


def test_python_dash_m_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "routedsl", "check", str(EXAMPLE)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.endswith("OK (4 engines, 8 rules, 9 expectations)\n")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("routedsl ")
