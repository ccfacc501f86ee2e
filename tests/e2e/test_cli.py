"""`routedsl serve` flags: a bad flag is a clear message and exit 2, never a traceback."""
from __future__ import annotations

import pytest

from server.cli import main


@pytest.mark.parametrize("argv, words", [
    (["serve", "r.rules", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["serve", "r.rules", "--listen", "127.0.0.1"], "--listen: '127.0.0.1' has no port"),
    (["serve", "r.rules", "--listen", "127.0.0.1:99999"], "--listen: '99999' is not a port"),
    (["serve", "r.rules", "--nameserver", "dns.example"], "--nameserver: 'dns.example' is not an IP address"),
    (["serve", "r.rules", "--relay-network", "10.0.0.0/33"], "--relay-network: '10.0.0.0/33' is not a network"),
    (["serve", "r.rules", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
    (["serve", "r.rules", "--metrics", "localhost"], "--metrics: 'localhost' has no port"),
    (["serve", "r.rules", "--max-size", "12zb"], "--max-size: '12zb' is not a size"),
    (["serve", "r.rules", "--min-backoff", "10m", "--max-backoff", "1m"], "--max-backoff (1m) is shorter"),
    (["serve", "r.rules", "--hop-limit", "0"], "--hop-limit must be more than 0"),
    (["serve"], "the following arguments are required: FILE"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_bad_usage_exits_2_with_a_clear_message(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err
    assert "Traceback" not in err


def test_help_exits_0(capsys):
    assert main(["serve", "--help"]) == 0
    assert "--min-backoff" in capsys.readouterr().out


def test_queue_status_and_users_are_handed_on(tmp_path, capsys):
    from server.queue import Spool

    spool = tmp_path / "spool"
    with Spool(spool) as opened:
        opened.put("a@home.test", ["b@example.net"], b"Subject: x\r\n\r\nhi\r\n")
    assert main(["queue", "list", "--spool", str(spool)]) == 0
    assert "b@example.net" in capsys.readouterr().out
    assert main(["queue", "show", "NOSUCHID", "--spool", str(spool)]) == 1
    assert main(["status", "--spool", str(spool)]) in (0, 1)
    assert main(["users"]) == 2
