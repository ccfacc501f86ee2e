"""build_snapshot: compile, resolve secrets, reuse unchanged engines, refuse what cannot run."""
from __future__ import annotations

import re

import pytest

from server.snapshot import ReloadRefused, build_snapshot, retired_engines
from tests.reload.conftest import rules

BASE = rules(
    "isp = smtp://127.0.0.1:2601 tls none",
    "backup = smtp://127.0.0.1:2602 tls none",
    rule_lines=("if destination is aol.com then try backup first",),
)


def test_first_build_has_every_engine_in_declared_order(ctx):
    snap = build_snapshot(BASE, "routes.rules", ctx)
    assert list(snap.engines) == ["isp", "backup"]
    assert snap.version == snap.table.version
    assert re.fullmatch(r"[0-9a-f]{12}", snap.version)
    assert snap.table.plan("friend@aol.com").engines == ("backup", "isp")
    assert retired_engines(None, snap) == []


def test_unchanged_engines_are_reused_and_a_changed_port_gets_a_new_engine(ctx):
    first = build_snapshot(BASE, "routes.rules", ctx)
    moved = BASE.replace("2602", "2612") + "if destination is example.org then try backup first\n"
    second = build_snapshot(moved, "routes.rules", ctx, previous=first)
    assert second.engines["isp"] is first.engines["isp"]
    assert second.engines["backup"] is not first.engines["backup"]
    assert second.engines["backup"].spec.port == 2612
    assert retired_engines(first, second) == [first.engines["backup"]]
    assert second.version != first.version


def test_an_engine_moved_to_another_line_is_still_reused(ctx):
    first = build_snapshot(BASE, "routes.rules", ctx)
    second = build_snapshot("# moved down by a comment\n" + BASE, "routes.rules", ctx, first)
    assert second.engines["isp"] is first.engines["isp"]
    assert second.engines["backup"] is first.engines["backup"]


def test_a_removed_engine_is_retired(ctx):
    first = build_snapshot(BASE, "routes.rules", ctx)
    only_isp = rules("isp = smtp://127.0.0.1:2601 tls none")
    second = build_snapshot(only_isp, "routes.rules", ctx, first)
    assert list(second.engines) == ["isp"]
    assert retired_engines(first, second) == [first.engines["backup"]]


def test_changed_credentials_get_a_new_engine(ctx, monkeypatch):
    text = rules('isp = smtp://127.0.0.1:2601 user "me" password env:RELOAD_TEST_PW',
                 "backup = smtp://127.0.0.1:2602 tls none")
    monkeypatch.setenv("RELOAD_TEST_PW", "first")
    first = build_snapshot(text, "routes.rules", ctx)
    same = build_snapshot(text, "routes.rules", ctx, first)
    assert same.engines["isp"] is first.engines["isp"]
    monkeypatch.setenv("RELOAD_TEST_PW", "second")
    changed = build_snapshot(text, "routes.rules", ctx, first)
    assert changed.engines["isp"] is not first.engines["isp"]
    assert changed.engines["backup"] is first.engines["backup"]
    # The digest that decides reuse never shows the secret.
    assert "second" not in repr(changed)


def test_changed_user_gets_a_new_engine(ctx, monkeypatch):
    monkeypatch.setenv("RELOAD_TEST_PW", "pw")
    before = rules('isp = smtp://127.0.0.1:2601 user "me" password env:RELOAD_TEST_PW')
    after = before.replace('"me"', '"you"')
    first = build_snapshot(before, "routes.rules", ctx)
    second = build_snapshot(after, "routes.rules", ctx, first)
    assert second.engines["isp"] is not first.engines["isp"]


def test_missing_env_secret_is_refused_at_file_line_col(ctx, monkeypatch):
    monkeypatch.delenv("RELOAD_TEST_MISSING", raising=False)
    text = rules("backup = smtp://127.0.0.1:2602 tls none",
                 'isp = smtp://127.0.0.1:2601 user "me" password env:RELOAD_TEST_MISSING')
    with pytest.raises(ReloadRefused) as caught:
        build_snapshot(text, "routes.rules", ctx)
    column = text.splitlines()[1].index("env:RELOAD_TEST_MISSING") + 1
    assert caught.value.text.startswith(f"routes.rules:2:{column}: error[missing-secret]")
    assert "RELOAD_TEST_MISSING" in caught.value.text
    assert "isp" in caught.value.text


def test_missing_secret_file_is_refused(ctx, tmp_path):
    absent = tmp_path / "nothing.pw"
    text = rules(f'isp = smtp://127.0.0.1:2601 user "me" password file:{absent}')
    with pytest.raises(ReloadRefused) as caught:
        build_snapshot(text, "conf/routes.rules", ctx)
    assert caught.value.text.startswith("conf/routes.rules:1:")
    assert "error[missing-secret]" in caught.value.text


def test_invalid_text_is_refused_with_the_check_rendering(ctx):
    import routedsl

    text = BASE + "if destination is aol.com then try bakup first\n"
    with pytest.raises(ReloadRefused) as caught:
        build_snapshot(text, "routes.rules", ctx)
    expected = routedsl.render_human(routedsl.check_text(text, "routes.rules"), text)
    assert caught.value.text == expected
    assert "routes.rules:4:" in caught.value.text
    assert "error[unknown-engine]" in caught.value.text


def test_empty_text_is_refused_for_having_no_engines(ctx):
    with pytest.raises(ReloadRefused) as caught:
        build_snapshot("", "routes.rules", ctx)
    assert "no-engines" in caught.value.text


def test_bytes_that_are_not_utf8_are_refused_as_check_reports_them(tmp_path, capsys):
    from routedsl.cli import main as routedsl_main
    from server.snapshot import decode_rules

    path = tmp_path / "routes.rules"
    path.write_bytes(BASE.encode().replace(b"aol.com", b"a\xffl.com"))
    with pytest.raises(ReloadRefused) as caught:
        decode_rules(path.read_bytes(), str(path))
    assert f"{path}:3:" in caught.value.text and "bad-encoding" in caught.value.text
    assert routedsl_main(["check", str(path)]) == 1
    assert caught.value.text.strip() in capsys.readouterr().out
