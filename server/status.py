"""The active rules version, as the running relay last recorded it: `routedsl status`.

This module owns `<spool>/active-rules.json`: the relay writes it (atomically: temp file,
fsync, rename) at start and after every accepted or refused reload, and
`routedsl status --spool DIR [--format json]` prints it with whether a relay still
holds the spool. It never talks to the relay and never writes anything but that file.

Exit codes: 0 when the status was printed, 1 when the spool has no status file (no relay
ever ran on it) or the file is unreadable, 2 on usage errors.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from server.files import replace_file

if TYPE_CHECKING:
    from server.snapshot import Snapshot

STATUS_FILE = "active-rules.json"
FORMAT_VERSION = 1


def describe(snapshot: "Snapshot", rules_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON-ready record of an active Snapshot."""
    table = snapshot.table
    return {
        "version": snapshot.version,
        "file": os.path.abspath(os.fspath(rules_path)),
        "engines": [spec.name for spec in table.engines],
        "rules": table.rule_count,
        "expects": table.expect_count,
        "loaded_at": snapshot.loaded_at,
    }


def write_active(spool: str | os.PathLike[str], snapshot: "Snapshot",
                 rules_path: str | os.PathLike[str],
                 refused: Optional[dict[str, Any]] = None) -> Path:
    """Record `snapshot` as the active version in `<spool>/active-rules.json` (blocking).

    `refused` (when given) describes the last reload that was refused: {"at", "reason"}.
    """
    record = {
        "format": FORMAT_VERSION,
        **describe(snapshot, rules_path),
        "pid": os.getpid(),
        "written_at": time.time(),
        "last_refused": refused,
    }
    target = Path(spool) / STATUS_FILE
    # 0644: `routedsl status` may run as another user than the relay
    replace_file(target, (json.dumps(record, indent=2) + "\n").encode("utf-8"), mode=0o644)
    return target


def read_active(spool: str | os.PathLike[str]) -> dict[str, Any]:
    """The recorded status; raises OSError or ValueError when missing or unreadable."""
    with open(Path(spool) / STATUS_FILE, "rb") as handle:
        record = json.loads(handle.read().decode("utf-8"))
    if not isinstance(record, dict) or "version" not in record:
        raise ValueError("not a status record")
    return record


def relay_running(spool: str | os.PathLike[str], record: dict[str, Any]) -> Optional[bool]:
    """Whether a relay holds the spool now (its lock), falling back to whether the pid
    that wrote `record` is alive. None when it cannot be told."""
    from server.queue import lock_holder

    try:
        return lock_holder(Path(spool)) is not None
    except OSError:
        pass
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render_text(record: dict[str, Any], running: Optional[bool], now: float) -> str:
    loaded = record.get("loaded_at")
    lines = [
        f"rules version: {record.get('version')}",
        f"file:          {record.get('file')}",
        f"engines:       {len(record.get('engines') or [])} ({', '.join(record.get('engines') or [])})",
        f"rules:         {record.get('rules')}",
        f"loaded at:     {_when(loaded, now)}",
        f"relay:         {_running_text(running, record)}",
    ]
    refused = record.get("last_refused")
    if isinstance(refused, dict):
        lines.append(f"last refused:  {_when(refused.get('at'), now)}: {refused.get('reason')}")
    return "\n".join(lines)


def _when(stamp: Any, now: float) -> str:
    if not isinstance(stamp, (int, float)):
        return "unknown"
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
    return f"{iso} ({_age(now - stamp)} ago)"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _running_text(running: Optional[bool], record: dict[str, Any]) -> str:
    pid = record.get("pid")
    if running is True:
        return f"running (pid {pid})"
    if running is False:
        return f"not running (last run: pid {pid})"
    return "unknown"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="routedsl status",
        description="Show the rules version the relay on a spool has active.")
    parser.add_argument("--spool", required=True, help="the relay's spool folder")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    try:
        record = read_active(args.spool)
    except FileNotFoundError:
        if not Path(args.spool).is_dir():
            print(f"routedsl status: no spool folder at {args.spool}", file=sys.stderr)
        else:
            print(f"routedsl status: no rules status in {args.spool} "
                  f"(no relay has run on this spool)", file=sys.stderr)
        return 1
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.errno != errno.ENOENT else exc
        print(f"routedsl status: cannot read {Path(args.spool) / STATUS_FILE}: {reason}",
              file=sys.stderr)
        return 1
    now = time.time()
    running = relay_running(args.spool, record)
    if args.format == "json":
        out = {key: record.get(key) for key in
               ("version", "file", "engines", "rules", "expects", "loaded_at", "pid",
                "last_refused")}
        loaded = record.get("loaded_at")
        out["age_seconds"] = round(now - loaded, 3) if isinstance(loaded, (int, float)) else None
        out["running"] = running
        print(json.dumps(out, indent=2))
    else:
        print(render_text(record, running, now))
    return 0
