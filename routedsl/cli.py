"""The `routedsl` command: `check` and `route` here; `serve`, `queue`, `status`, `users` in server.cli.

Owns argument parsing, reading the rules file, exit codes (0 valid, 1 errors or a failed
expectation, 2 usage errors or an unreadable file) and output formats (human, json).
`check` imports nothing of the relay or its network libraries; `route` imports dnspython
lazily, only when a rule tests `mx` and no --mx was given. The relay's subcommands are
handed to server.cli, imported only when asked for.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from routedsl.diagnostics import Diagnostic
    from routedsl.table import RouteTable

OK, FAILED, USAGE = 0, 1, 2
RELAY_COMMANDS = ("serve", "queue", "status", "users")


def _size_arg(text: str) -> int:
    from routedsl.values import parse_size
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("routedsl")
    except PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    """--version, looked up only when asked for: importlib.metadata (and the zipfile
    module it brings) would otherwise stay in every relay's memory."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show the version and exit"):  # type: ignore[no-untyped-def]
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        print(f"routedsl {_version()}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="routedsl",
        description="A rules-driven SMTP relay. Language commands: check, route. "
                    "Relay commands: serve, queue, status, users (see 'routedsl serve --help').")
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("check", help="check a rules file: syntax, names, values, shadowed rules, expectations")
    c.add_argument("file", metavar="FILE", help="the rules file ('-' reads standard input)")
    c.add_argument("--strict", action="store_true", help="treat warnings as errors")
    c.add_argument("--format", choices=("human", "json"), default="human")
    r = sub.add_parser("route", help="show the plan for a recipient and the rule that decided it")
    r.add_argument("file", metavar="FILE")
    r.add_argument("--to", dest="to", action="append", required=True, metavar="ADDR",
                   help="the recipient (repeat for several)")
    r.add_argument("--from", dest="sender", default="", metavar="ADDR",
                   help="the envelope sender (default: empty, as for a bounce)")
    r.add_argument("--size", type=_size_arg, default=0, metavar="SIZE", help="message size, e.g. 3mb")
    r.add_argument("--mx", action="append", default=None, metavar="HOST",
                   help="the recipient domain's MX hosts (repeat); without it, `mx` rules look them up in DNS")
    r.add_argument("--nameserver", default=None, metavar="IP[:PORT]", help="DNS server for MX look-ups")
    r.add_argument("--format", choices=("human", "json"), default="human")
    for name in RELAY_COMMANDS:
        sub.add_parser(name, help=f"relay command (see 'routedsl {name} --help')", add_help=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in RELAY_COMMANDS:
        return _relay(argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:       # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command == "check":
        return check(args.file, strict=args.strict, fmt=args.format)
    if args.command == "route":
        return route(args)
    _parser().print_help(sys.stderr)
    return USAGE


def _relay(argv: list[str]) -> int:
    import importlib
    try:
        relay_cli = importlib.import_module("server.cli")
    except ModuleNotFoundError as exc:
        if exc.name not in ("server", "server.cli"):
            raise
        print(f"routedsl: '{argv[0]}' needs the relay (the server package), which is not installed",
              file=sys.stderr)
        return USAGE
    return int(relay_cli.main(argv))


def _read(path: str) -> tuple[Optional[bytes], str]:
    if path == "-":
        return sys.stdin.buffer.read(), "<stdin>"
    try:
        with open(path, "rb") as f:
            return f.read(), path
    except OSError as exc:
        print(f"routedsl: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return None, path


def _analysed(path: str, *, strict: bool = False
              ) -> Optional[tuple[str, str, Optional["RouteTable"], list["Diagnostic"]]]:
    """The file read, decoded and checked: (name, text as shown, table or None, diagnostics);
    None when it cannot be read (the reason is printed)."""
    from routedsl.api import RulesError, analyse, decode

    data, name = _read(path)
    if data is None:
        return None
    try:
        text = decode(data, name)
    except RulesError as exc:
        return name, exc.text, None, exc.diagnostics
    table, diags, _ = analyse(text, name, strict=strict)
    return name, text, table, diags


def check(path: str, *, strict: bool = False, fmt: str = "human") -> int:
    from routedsl.diagnostics import render_human, render_json

    loaded = _analysed(path, strict=strict)
    if loaded is None:
        return USAGE
    name, text, table, diags = loaded
    if fmt == "json":
        sys.stdout.write(render_json(diags))
    else:
        sys.stdout.write(render_human(diags, text))
        if table is not None:
            print(f"{name}: OK ({_count(len(table.engines), 'engine')}, {_count(table.rule_count, 'rule')}, "
                  f"{_count(table.expect_count, 'expectation')})")
    return FAILED if table is None else OK


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def route(args: argparse.Namespace) -> int:
    from routedsl.diagnostics import render_human
    from routedsl.values import domain_of

    loaded = _analysed(args.file)
    if loaded is None:
        return USAGE
    _, text, table, diags = loaded
    if table is None:
        sys.stderr.write(render_human(diags, text))
        return FAILED
    results = []
    for rcpt in args.to:
        mx: tuple[str, ...] = tuple(args.mx or ())
        if table.needs_mx and args.mx is None:
            mx = lookup_mx(domain_of(rcpt), args.nameserver)
        decision = table.plan(rcpt, args.sender, args.size, mx)
        results.append((rcpt, decision))
    if args.format == "json":
        out = [{"recipient": r, "plan": list(d.engines),
                "rule": {"line": d.rule.line, "text": d.rule.text} if d.rule else None} for r, d in results]
        print(json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False))
    else:
        for r, d in results:
            why = f"{d.rule.file}:{d.rule.line}  {d.rule.text}" if d.rule else "no rule matched: the declared order"
            print(f"{r}: {' → '.join(d.engines)}   ({why})")
    return OK


def lookup_mx(domain: str, nameserver: Optional[str]) -> tuple[str, ...]:
    """The MX host names of `domain` by preference, () when there are none or DNS fails (with a note)."""
    if not domain:
        return ()
    import dns.exception
    import dns.resolver

    try:
        if nameserver:
            host, port = _split_server(nameserver)
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [host]
            resolver.port = port
        else:
            resolver = dns.resolver.Resolver()
        resolver.lifetime = 5.0
        answer = resolver.resolve(domain, "MX")
        records = sorted(answer, key=lambda r: r.preference)
        return tuple(str(r.exchange).rstrip(".").lower() for r in records if str(r.exchange) != ".")
    except (dns.exception.DNSException, OSError, ValueError) as exc:
        print(f"routedsl: no MX hosts for {domain} ({exc.__class__.__name__}: {exc}); "
              "routing as if it had none", file=sys.stderr)
        return ()


def _split_server(text: str) -> tuple[str, int]:
    if text.startswith("["):                       # [::1]:5353
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53


if __name__ == "__main__":
    raise SystemExit(main())
