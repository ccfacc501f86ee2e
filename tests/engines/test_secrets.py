"""Passwords from env:, file: and literals; every failure is a SecretError with a reason."""
from __future__ import annotations

import pytest

from routedsl.table import SecretRef
from server.secrets import SecretError, resolve_secret


def test_none_is_none():
    assert resolve_secret(None) is None


def test_literal():
    assert resolve_secret(SecretRef("literal", "s3cret")) == "s3cret"


def test_env(monkeypatch):
    monkeypatch.setenv("ROUTEDSL_TEST_PW", "from-env")
    assert resolve_secret(SecretRef("env", "ROUTEDSL_TEST_PW")) == "from-env"


def test_env_missing(monkeypatch):
    monkeypatch.delenv("ROUTEDSL_TEST_PW", raising=False)
    with pytest.raises(SecretError, match="ROUTEDSL_TEST_PW is not set"):
        resolve_secret(SecretRef("env", "ROUTEDSL_TEST_PW"))


def test_env_empty(monkeypatch):
    monkeypatch.setenv("ROUTEDSL_TEST_PW", "")
    with pytest.raises(SecretError, match="empty"):
        resolve_secret(SecretRef("env", "ROUTEDSL_TEST_PW"))


def test_file_strips_one_newline(tmp_path):
    path = tmp_path / "pw"
    path.write_text("pass word\n\n")
    assert resolve_secret(SecretRef("file", str(path))) == "pass word\n"
    path.write_text("crlf\r\n")
    assert resolve_secret(SecretRef("file", str(path))) == "crlf"


@pytest.mark.parametrize("content,reason", [("", "empty"), ("\n", "empty")])
def test_file_empty(tmp_path, content, reason):
    path = tmp_path / "pw"
    path.write_text(content)
    with pytest.raises(SecretError, match=reason):
        resolve_secret(SecretRef("file", str(path)))


def test_file_missing(tmp_path):
    with pytest.raises(SecretError, match="does not exist"):
        resolve_secret(SecretRef("file", str(tmp_path / "nope")))


def test_file_is_a_directory(tmp_path):
    with pytest.raises(SecretError, match="directory"):
        resolve_secret(SecretRef("file", str(tmp_path)))


def test_file_unreadable_names_the_file_not_the_value(tmp_path):
    path = tmp_path / "pw"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(SecretError) as info:
        resolve_secret(SecretRef("file", str(path)))
    assert str(path) in info.value.message
