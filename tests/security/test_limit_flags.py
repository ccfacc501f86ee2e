"""The limit flags: every bound has one, values are parsed like the rules file's sizes and
durations, nonsense is a usage error naming the flag, and unset flags keep the defaults."""
from __future__ import annotations

import argparse

import pytest

from server import limits
from server.limits import Limits


def parse(*argv: str) -> Limits:
    parser = argparse.ArgumentParser()
    limits.add_arguments(parser)
    return limits.from_args(parser.parse_args(list(argv)))


def test_defaults_follow_postfix():
    got = parse()
    assert got == Limits()
    assert (got.max_recipients, got.hop_limit, got.min_data_rate, got.idle_timeout) == (1000, 50, 500, 300.0)
    assert got.reserve_for(35_000_000) == 52_500_000


def test_values_with_units():
    got = parse("--max-header-size", "1mib", "--session-timeout", "20m", "--disk-reserve", "2gb",
                "--max-connections-per-ip", "5", "--auth-failure-delay", "0.5s")
    assert (got.max_header_size, got.session_timeout, got.disk_reserve) == (1024**2, 1200.0, 2 * 10**9)
    assert (got.max_connections_per_ip, got.auth_failure_delay) == (5, 0.5)


@pytest.mark.parametrize("argv, message", [
    (("--max-recipients", "0"), "--max-recipients must be more than 0"),
    (("--max-line-length", "50"), "--max-line-length must be at least 100"),
])
def test_nonsense_is_refused_with_the_flag_name(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)


def test_unparsable_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit):
        parse("--idle-timeout", "soon")
    assert "--idle-timeout" in capsys.readouterr().err
