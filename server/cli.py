"""`routedsl serve|queue|status|users`: the relay's command line, a thin shell over callables.

`routedsl/cli.py` hands these subcommands here with argv starting at the subcommand.
`serve` is parsed here into a `ServeConfig` and run by `server.app.run`; `queue`,
`status` and `users` belong to their own modules and are handed on untouched.

Exit codes: 0 success, 1 the relay could not start (invalid rules, missing secret, spool
or port in use), 2 usage errors (unknown or malformed flags). Never a traceback for bad
input.
"""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

from server import limits
from server.access import DEFAULT_NETWORKS, AccessError, parse_networks
from server.config import (
    ConfigError,
    ServeConfig,
    parse_address,
    parse_duration_flag,
    parse_nameserver,
    parse_size_flag,
)

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() returns the exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def serve_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="routedsl serve", description="Run the relay on a routes file.")
    p.add_argument("rules", metavar="FILE", help="the routes.rules file")
    p.add_argument("--listen", default="127.0.0.1:2525", metavar="ADDR",
                   help="address for SMTP (default 127.0.0.1:2525)")
    p.add_argument("--spool", default="./spool", metavar="DIR", help="queue folder (default ./spool)")
    p.add_argument("--hostname", default=None, metavar="NAME",
                   help="name in the greeting, EHLO and Received headers (default: this host's name)")
    p.add_argument("--nameserver", action="append", default=[], metavar="IP[:PORT]",
                   help="DNS server for MX lookups (repeatable; default: the system's)")
    p.add_argument("--relay-network", action="append", default=[], metavar="CIDR",
                   help="clients allowed to relay (repeatable; default loopback only)")
    p.add_argument("--users", default=None, metavar="FILE", help="submission users (AUTH over TLS)")
    p.add_argument("--tls-cert", default=None, metavar="PEM")
    p.add_argument("--tls-key", default=None, metavar="PEM")
    p.add_argument("--listen-tls", default=None, metavar="ADDR", help="address for implicit TLS")
    p.add_argument("--max-size", default="35mb", metavar="SIZE")
    p.add_argument("--min-backoff", default="5m", metavar="DURATION")
    p.add_argument("--max-backoff", default="1h", metavar="DURATION")
    p.add_argument("--queue-lifetime", default="5d", metavar="DURATION")
    p.add_argument("--delay-warning", default="4h", metavar="DURATION")
    p.add_argument("--shutdown-timeout", default="30s", metavar="DURATION",
                   help="how long a stop waits for deliveries in flight (default 30s)")
    p.add_argument("--metrics", default=None, metavar="ADDR",
                   help="serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9325)")
    p.add_argument("--ca-file", default=None, metavar="PEM",
                   help="extra CA certificates trusted for smarthosts")
    p.add_argument("--smtp-processes", default="0", metavar="N",
                   help="run the SMTP conversations in N processes of their own, to use more "
                        "than one core (default 0: in the relay's process; limits are shared out)")
    limits.add_arguments(p)
    return p


def _existing_file(text: Optional[str], flag: str) -> Optional[Path]:
    if text is None:
        return None
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"{flag}: no such file: {text}")
    return path


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Turn parsed flags into a ServeConfig; raises ConfigError naming the bad flag."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.listen_tls and args.tls_cert is None:
        raise ConfigError("--listen-tls needs --tls-cert and --tls-key")
    listen = parse_address(args.listen, "--listen")
    listen_tls = parse_address(args.listen_tls, "--listen-tls") if args.listen_tls else None
    nameservers = tuple(parse_nameserver(n) for n in args.nameserver)
    try:
        networks = tuple(str(n) for n in parse_networks(args.relay_network))
    except AccessError as exc:
        raise ConfigError(f"--relay-network: {exc}") from None
    min_backoff = parse_duration_flag(args.min_backoff, "--min-backoff")
    max_backoff = parse_duration_flag(args.max_backoff, "--max-backoff")
    if min_backoff <= 0:
        raise ConfigError("--min-backoff must be more than 0")
    if max_backoff < min_backoff:
        raise ConfigError(f"--max-backoff ({args.max_backoff}) is shorter than --min-backoff ({args.min_backoff})")
    max_size = parse_size_flag(args.max_size, "--max-size")
    if max_size <= 0:
        raise ConfigError("--max-size must be more than 0")
    if not args.smtp_processes.isdigit() or not 0 <= int(args.smtp_processes) <= 64:
        raise ConfigError(f"--smtp-processes: '{args.smtp_processes}' is not a number from 0 to 64")
    return ServeConfig(
        rules=Path(args.rules),
        listen=listen,
        spool=Path(args.spool),
        hostname=args.hostname or socket.gethostname() or "localhost",
        nameservers=nameservers,
        relay_networks=networks or DEFAULT_NETWORKS,
        users=_existing_file(args.users, "--users"),
        tls_cert=_existing_file(args.tls_cert, "--tls-cert"),
        tls_key=_existing_file(args.tls_key, "--tls-key"),
        listen_tls=listen_tls,
        max_size=max_size,
        min_backoff=min_backoff,
        max_backoff=max_backoff,
        queue_lifetime=parse_duration_flag(args.queue_lifetime, "--queue-lifetime"),
        delay_warning=parse_duration_flag(args.delay_warning, "--delay-warning"),
        ca_file=_existing_file(args.ca_file, "--ca-file"),
        metrics=parse_address(args.metrics, "--metrics") if args.metrics else None,
        shutdown_timeout=parse_duration_flag(args.shutdown_timeout, "--shutdown-timeout"),
        limits=_limits_from(args),
        smtp_processes=int(args.smtp_processes),
    )


def _limits_from(args: argparse.Namespace):
    try:
        return limits.from_args(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def serve_main(argv: Sequence[str]) -> int:
    parser = serve_parser()
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    try:
        config = config_from_args(parser.parse_args(list(argv)))
    except ConfigError as exc:
        print(f"routedsl serve: {exc}", file=sys.stderr)
        print(parser.format_usage().rstrip(), file=sys.stderr)
        return USAGE_ERROR
    # Build the rules parser before the relay's modules load. What its construction frees
    # is then filled by their objects; built later, it leaves holes in the heap for good
    # (about 1 MiB of the relay's memory, measured in bench/throughput).
    from routedsl.syntax import parser
    parser()
    from server.app import run
    return run(config)


def _hand_on(module: str, argv: Sequence[str]) -> int:
    import importlib
    return int(importlib.import_module(f"server.{module}").main(list(argv)) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: routedsl serve|queue|status|users ...", file=sys.stderr)
        return USAGE_ERROR
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve_main(rest)
    if command == "queue":
        return _hand_on("queue_cli", rest)
    if command in ("status", "users"):
        return _hand_on(command, rest)
    print(f"routedsl: unknown command '{command}' (expected serve, queue, status or users)", file=sys.stderr)
    return USAGE_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
