"""The users file: `routedsl users add FILE LOGIN` (password from a non-tty stdin here),
salted self-describing scrypt hashes, constant-time verify, atomic 0600 rewrite."""
from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

import pytest

from server import users
from server.users import UserStore, check_password, hash_password, read_users


def run_users(monkeypatch, args, stdin_text):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    return users.main(args)


def test_add_writes_a_salted_hash_with_mode_0600(tmp_path, monkeypatch):
    path = tmp_path / "users"
    assert run_users(monkeypatch, ["add", str(path), "alice"], "s3cret pass\n") == 0
    assert run_users(monkeypatch, ["add", str(path), "bob"], "s3cret pass\n") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "s3cret" not in text
    stored = read_users(path)
    assert set(stored) == {"alice", "bob"}
    assert stored["alice"].startswith("$scrypt$n=") and stored["alice"] != stored["bob"]   # salted
    store = UserStore(path)
    assert store.verify("alice", "s3cret pass")
    assert not store.verify("alice", "s3cret pass ")
    assert not store.verify("carol", "s3cret pass")


def test_add_again_changes_the_password_and_keeps_comments(tmp_path, monkeypatch):
    path = tmp_path / "users"
    path.write_text(f"# submission users\nalice:{hash_password('old')}\n")
    os.chmod(path, 0o600)
    store = UserStore(path)
    assert store.verify("alice", "old")
    assert run_users(monkeypatch, ["add", str(path), "alice"], "new\n") == 0
    assert path.read_text().startswith("# submission users\n")
    assert store.verify("alice", "new") and not store.verify("alice", "old")   # re-read on change
    assert [p.name for p in tmp_path.iterdir()] == ["users"]                   # no temp file left


def test_remove_and_list(tmp_path, monkeypatch, capsys):
    path = tmp_path / "users"
    run_users(monkeypatch, ["add", str(path), "alice"], "pw\n")
    run_users(monkeypatch, ["add", str(path), "bob"], "pw\n")
    assert users.main(["remove", str(path), "alice"]) == 0
    capsys.readouterr()
    assert users.main(["list", str(path)]) == 0
    assert capsys.readouterr().out == "bob\n"
    assert users.main(["remove", str(path), "alice"]) == 1


@pytest.mark.parametrize("args, stdin_text, code", [
    (["add"], "", 2),
    (["frob", "f", "x"], "", 2),
    (["add", "{path}", "al:ice"], "pw\n", 2),
    (["add", "{path}", "al ice"], "pw\n", 2),
    (["add", "{path}", "alice"], "\n", 1),
])
def test_bad_usage_is_a_clear_error(tmp_path, monkeypatch, capsys, args, stdin_text, code):
    args = [a.replace("{path}", str(tmp_path / "users")) for a in args]
    assert run_users(monkeypatch, args, stdin_text) == code
    assert "routedsl users" in capsys.readouterr().err or code == 2
    assert not (tmp_path / "users").exists()


def test_malformed_hashes_never_verify():
    for stored in ("", "plain", "$scrypt$", "$scrypt$n=x$a$b", "$md5$abc"):
        assert check_password("pw", stored) is False


def test_malformed_users_file_is_reported_with_its_line(tmp_path):
    path = tmp_path / "users"
    path.write_text("alice:$scrypt$x\nbroken line\n")
    with pytest.raises(users.UsersError, match=":2:"):
        read_users(path)


def test_command_line_reads_the_password_from_stdin(tmp_path):
    path = tmp_path / "users"
    proc = subprocess.run([sys.executable, "-c", "import sys; from server.users import main; "
                           "sys.exit(main(sys.argv[1:]))", "add", str(path), "carol"],
                          input="from stdin\n", capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert UserStore(path).verify("carol", "from stdin")
