"""Limits: every bound the SMTP server enforces, with defaults a mail administrator expects.

This module owns the numbers and their `serve` flags (`add_arguments`, `from_args`).
The defaults follow Postfix where Postfix has an equivalent (named beside each field),
so the relay behaves like the MTA administrators already know. It never enforces a
limit itself: server/smtp.py does, reading a `Limits` value.

The message size (`--max-size`) is part of ServeConfig, not of these flags; the disk
reserve defaults to 1.5 times that size, as Postfix requires of its queue file system.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Optional

# Sizes and durations are spelled as in the rules file (the units the README documents).
from routedsl.values import parse_duration, parse_size


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds of one relay instance (all connections and listeners share them)."""
    # Connections in all (Postfix default_process_limit 100) and per client IP
    # (smtpd_client_connection_count_limit 50). Over: 421 and close.
    max_connections: int = 100
    max_connections_per_ip: int = 50
    # Recipients per message (smtpd_recipient_limit 1000; RFC 5321 requires >= 100). Over: 452 4.5.3.
    max_recipients: int = 1000
    # Commands per session, and NOOP/RSET/VRFY/HELP/EXPN per session
    # (smtpd_junk_command_limit 100). Over: 421 4.7.0 and close.
    max_commands: int = 10_000
    max_junk_commands: int = 100
    # Error replies per session (smtpd_hard_error_limit 20): then 421 4.7.0 and close.
    # `452 4.5.3` for recipients over the limit counts only beyond a second max_recipients
    # (smtpd_recipient_overshoot_limit), so a large mailing still gets to DATA.
    max_errors: int = 20
    # Octets per line of a command or of DATA, CRLF included (RFC 5321 4.5.3.1.6: 1000).
    max_line_length: int = 1000
    # The header section of a message (header_size_limit 102400). Over: 552 5.3.4.
    max_header_size: int = 102_400
    # More Received headers than this: 554 5.4.6 (hopcount_limit 50, RFC 5321 6.3).
    hop_limit: int = 50
    # Seconds without a complete command (smtpd_timeout 300s).
    idle_timeout: float = 300.0
    # A whole session ends after this, whatever it does (chasquid uses a session deadline too).
    session_timeout: float = 1800.0
    # DATA must average at least this many bytes per second (smtpd_min_data_rate 500).
    min_data_rate: int = 500
    # AUTH: failures per connection before 421 (chasquid closes after 3), failures per client
    # IP per window before 454 4.7.0 for every further attempt, and the delay after a failure
    # (smtpd_error_sleep_time 1s).
    max_auth_failures: int = 3
    max_auth_failures_per_ip: int = 10
    auth_failure_window: float = 60.0
    auth_failure_delay: float = 1.0
    # Message data all sessions together may hold in memory while DATA is read (aiosmtpd keeps
    # a message in memory, A14); never less than one message of the size limit. Over: 451 4.3.2.
    max_data_memory: int = 128 * 1024 * 1024
    # Messages, and bytes, the queue may hold before MAIL answers 452 4.3.1 (chasquid's
    # max_queue_items; None = no byte bound beyond the disk reserve).
    max_queue_messages: int = 100_000
    max_queue_size: Optional[int] = None
    # Free space the spool must keep at MAIL; None = 1.5 x the message size limit. Under: 452 4.3.1.
    disk_reserve: Optional[int] = None

    def reserve_for(self, max_size: int) -> int:
        return self.disk_reserve if self.disk_reserve is not None else (max_size * 3) // 2


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"'{text}' is not a whole number")
    return int(text)


def _typed(parse):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__.lstrip("_")
    return convert


# flag, field, parser, help
_FLAGS = (
    ("--max-connections", "max_connections", _count, "simultaneous SMTP connections in all"),
    ("--max-connections-per-ip", "max_connections_per_ip", _count, "simultaneous connections from one client IP"),
    ("--max-recipients", "max_recipients", _count, "recipients per message (then 452 4.5.3)"),
    ("--max-commands", "max_commands", _count, "commands per session"),
    ("--max-junk-commands", "max_junk_commands", _count, "NOOP, RSET, VRFY, HELP, EXPN per session"),
    ("--max-errors", "max_errors", _count, "error replies per session before it is closed"),
    ("--max-line-length", "max_line_length", _count, "octets per line, CRLF included"),
    ("--max-header-size", "max_header_size", parse_size, "size of a message's header section"),
    ("--hop-limit", "hop_limit", _count, "Received headers a message may carry"),
    ("--idle-timeout", "idle_timeout", parse_duration, "time allowed for one command"),
    ("--session-timeout", "session_timeout", parse_duration, "time allowed for a whole session"),
    ("--min-data-rate", "min_data_rate", _count, "bytes per second a client must keep up during DATA"),
    ("--max-auth-failures", "max_auth_failures", _count, "failed logins per connection before it is closed"),
    ("--max-auth-failures-per-ip", "max_auth_failures_per_ip", _count,
     "failed logins per client IP per --auth-failure-window"),
    ("--auth-failure-window", "auth_failure_window", parse_duration, "window of the per-IP login failure count"),
    ("--auth-failure-delay", "auth_failure_delay", parse_duration, "delay before answering a failed login"),
    ("--max-data-memory", "max_data_memory", parse_size,
     "message data held in memory by all sessions together (at least --max-size)"),
    ("--max-queue-messages", "max_queue_messages", _count, "messages waiting in the queue before MAIL gets 452"),
    ("--max-queue-size", "max_queue_size", parse_size, "bytes waiting in the queue before MAIL gets 452"),
    ("--disk-reserve", "disk_reserve", parse_size, "free spool space needed to accept MAIL (default 1.5 x --max-size)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per limit; each help text shows its default."""
    defaults = Limits()
    group = parser.add_argument_group("limits")
    for flag, name, parse, help_text in _FLAGS:
        default = getattr(defaults, name)
        metavar = {parse_size: "SIZE", parse_duration: "DURATION"}.get(parse, "N")
        shown = ("" if default is None else f" (default {default:g}s)" if metavar == "DURATION"
                 else f" (default {default})")
        group.add_argument(flag, dest=f"limit_{name}", type=_typed(parse), default=None,
                           metavar=metavar, help=help_text + shown)


def from_args(args: argparse.Namespace) -> Limits:
    """A Limits from parsed flags; flags not given keep their defaults. Raises ValueError on nonsense."""
    given = {f.name: getattr(args, f"limit_{f.name}") for f in fields(Limits)
             if getattr(args, f"limit_{f.name}", None) is not None}
    limits = Limits(**given)
    validate(limits)
    return limits


def validate(limits: Limits) -> None:
    """Refuse bounds that would make the server unusable: ValueError naming the flag
    (serve's command line reports it as a usage error)."""
    positive = ("max_connections", "max_connections_per_ip", "max_recipients", "max_commands", "max_errors",
                "max_line_length", "max_header_size", "hop_limit", "idle_timeout", "session_timeout",
                "max_auth_failures", "max_auth_failures_per_ip", "max_data_memory",
                "max_queue_messages")
    for name in positive:
        if getattr(limits, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be more than 0")
    if limits.max_line_length < 100:
        raise ValueError("--max-line-length must be at least 100 (RFC 5321 allows 1000)")
