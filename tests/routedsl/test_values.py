"""Sizes and durations (also the relay's --max-size and --min-backoff), engine URLs, secrets."""
import pytest

from routedsl.values import parse_duration, parse_engine_url, parse_secret_ref, parse_size


@pytest.mark.parametrize("text,n", [
    ("2000kb", 2_000_000), ("2MB", 2_000_000), ("35mb", 35_000_000), ("1gb", 10**9), ("10b", 10), ("10", 10),
    ("1kib", 1024), ("2MiB", 2 * 1024**2), ("1gib", 1024**3), ("1.5mb", 1_500_000), ("0b", 0),
])
def test_sizes_use_powers_of_1000_and_1024(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text,s", [("60s", 60), ("5m", 300), ("1h", 3600), ("5d", 432000), ("90", 90), ("1.5m", 90)])
def test_durations_are_seconds(text, s):
    assert parse_duration(text) == s


@pytest.mark.parametrize("bad", ["", "mb", "2 000kb", "-1mb", "2kbytes", "3 parsecs", "1e3"])
def test_bad_sizes_say_how_to_write_one(bad):
    with pytest.raises(ValueError, match="not a size; write a number with b, kb"):
        parse_size(bad)


@pytest.mark.parametrize("bad", ["", "5 minutes", "5w", "-1s", "soon"])
def test_bad_durations_say_how_to_write_one(bad):
    with pytest.raises(ValueError, match="not a duration; write a number with s, m, h or d"):
        parse_duration(bad)


def test_engine_urls():
    u = parse_engine_url("SMTPS://Smtp.Example.COM")
    assert (u.kind, u.host, u.port) == ("smtps", "smtp.example.com", None)
    assert parse_engine_url("smtp://[::1]:2525").host == "::1"
    for bad in ("http://x", "smtp://", "smtp://user:pw@host", "smtp://h/path", "smtp://h:0", "smtp://h:x"):
        with pytest.raises(ValueError):
            parse_engine_url(bad)


def test_secret_refs_are_checked_for_form_only():
    assert parse_secret_ref("env:ISP_PASSWORD") == ("env", "ISP_PASSWORD")
    assert parse_secret_ref("file:/nonexistent/pw") == ("file", "/nonexistent/pw")
    for bad in ("env:", "env:1X", "file:", "vault:x"):
        with pytest.raises(ValueError):
            parse_secret_ref(bad)
