"""`routedsl status --spool DIR`: the active rules version as the relay recorded it."""
from __future__ import annotations

import json
import subprocess
import sys

from server import status
from server.queue import Spool
from server.snapshot import build_snapshot
from tests.reload.conftest import rules

TEXT = rules("a = smtp://127.0.0.1:2601 tls none", "b = smtp://127.0.0.1:2602 tls none",
             rule_lines=("if destination is x.test then try b first",))


def test_text_output_names_version_engines_rules_and_the_running_relay(tmp_path, ctx, capsys):
    snap = build_snapshot(TEXT, "routes.rules", ctx)
    with Spool(tmp_path):   # as a relay holds the spool: its lock is taken
        status.write_active(tmp_path, snap, tmp_path / "routes.rules")
        assert status.main(["--spool", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"rules version: {snap.version}" in out
    assert "engines:       2 (a, b)" in out
    assert "rules:         1" in out
    assert "loaded at:" in out and "ago)" in out
    assert "running (pid" in out   # this process wrote it and is alive


def test_json_output(tmp_path, ctx, capsys):
    snap = build_snapshot(TEXT, "routes.rules", ctx)
    with Spool(tmp_path):
        status.write_active(tmp_path, snap, tmp_path / "routes.rules",
                            refused={"at": snap.loaded_at, "reason": "routes.rules:3:1: error[x]"})
        assert status.main(["--spool", str(tmp_path), "--format", "json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["version"] == snap.version
    assert record["engines"] == ["a", "b"]
    assert record["rules"] == 1
    assert record["file"] == str(tmp_path / "routes.rules")
    assert record["running"] is True
    assert record["age_seconds"] >= 0
    assert record["last_refused"]["reason"].startswith("routes.rules:3:1")


def test_a_relay_that_has_gone_is_reported_as_not_running(tmp_path, ctx, capsys):
    snap = build_snapshot(TEXT, "routes.rules", ctx)
    status.write_active(tmp_path, snap, "routes.rules")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    path = tmp_path / status.STATUS_FILE
    record = json.loads(path.read_text())
    record["pid"] = int(gone.stdout)
    path.write_text(json.dumps(record))
    assert status.main(["--spool", str(tmp_path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["running"] is False


def test_no_status_file_is_a_clear_error(tmp_path, capsys):
    assert status.main(["--spool", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no rules status" in err and "Traceback" not in err
    assert status.main(["--spool", str(tmp_path / "absent")]) == 1
    assert "no spool folder at" in capsys.readouterr().err


def test_garbage_status_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / status.STATUS_FILE).write_bytes(b"\xff{not json")
    assert status.main(["--spool", str(tmp_path)]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_usage_error_exits_2(capsys):
    assert status.main([]) == 2
    assert status.main(["--spool", "x", "--format", "yaml"]) == 2
