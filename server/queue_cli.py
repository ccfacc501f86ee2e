"""`routedsl queue list|show ID|retry ID|retry --all|delete ID --spool DIR [--format json]`.

Owns the operator's view of the spool and the two actions on it. It never writes a spool
file that a running relay owns: reading is lock-free (every spool file is replaced
atomically), and when a relay holds the spool lock, `retry` and `delete` are dropped as
request files into the control folder, which the relay polls (at most every second) and
answers. When no relay runs, the command takes the spool lock itself and acts directly.

Exit status as `routedsl check`: 0 done, 1 a problem (unknown id, no spool, the relay did
not answer), 2 a usage error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, TextIO

from server.queue import (Entry, Spool, SpoolBusy, SpoolError, is_queue_id, lock_holder,
                          read_entry, read_headers, scan, submit_request)

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("routedsl.queue_cli")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--spool", default="./spool", metavar="DIR",
                        help="the relay's spool folder (default ./spool)")
    common.add_argument("--format", choices=("text", "json"), default="text")
    common.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for a running relay to answer (default 10)")
    parser = argparse.ArgumentParser(prog="routedsl queue",
                                     description="Inspect and act on the relay's queue.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", parents=[common], help="every waiting message")
    p = sub.add_parser("show", parents=[common], help="one message in detail, with its headers")
    p.add_argument("id")
    p = sub.add_parser("retry", parents=[common], help="deliver now instead of waiting")
    p.add_argument("id", nargs="?")
    p.add_argument("--all", action="store_true", help="every message")
    p = sub.add_parser("delete", parents=[common], help="remove a message without delivering it")
    p.add_argument("id")
    return parser


def main(argv: Optional[Sequence[str]] = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = _parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse has printed the usage error
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    if args.command == "retry" and (args.all == (args.id is not None)):
        print("routedsl queue retry: give one queue id or --all", file=err)
        return EXIT_USAGE
    root = Path(args.spool)
    if not (root / "msg").is_dir():
        print(f"routedsl queue: no spool at {root}", file=err)
        return EXIT_PROBLEM
    if args.command == "list":
        return _list(root, args.format, out)
    if args.command == "show":
        return _show(root, args.id, args.format, out, err)
    qid = None if args.command == "retry" and args.all else args.id
    if qid is not None and not is_queue_id(qid):
        print(f"routedsl queue: no message {qid} in the queue (a queue id is 20 hex digits)", file=err)
        return EXIT_PROBLEM
    return _act(root, args.command, qid, args.wait, args.format, out, err)


# ---------------------------------------------------------------- reading

def _entry_json(e: Entry, now: float) -> dict:
    m, s = e.message, e.state
    return {
        "id": m.id, "kind": m.kind, "sender": m.sender, "size": m.size,
        "arrival": m.arrival, "age": round(now - m.arrival, 3),
        "attempts": s.attempts, "next_attempt": s.next_attempt,
        "delay_notified": s.delay_notified,
        "recipients": [{"address": r.address, "status": r.status,
                        "replies": {eng: text for eng, text in r.replies}} for r in s.recipients],
        "last_replies": s.engine_replies(),
        **({"state_error": e.state_error} if e.state_error else {}),
    }


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _size(n: int) -> str:
    return f"{n} B" if n < 1000 else f"{n / 1000:.1f} kB" if n < 1_000_000 else f"{n / 1e6:.1f} MB"


def _entry_text(e: Entry, now: float) -> list[str]:
    m, s = e.message, e.state
    nxt = "now" if s.next_attempt <= now else f"in {_duration(s.next_attempt - now)}"
    kind = "" if m.kind == "mail" else f"  ({m.kind})"
    lines = [f"{m.id}  {_size(m.size):>8}  age {_duration(now - m.arrival):>6}  "
             f"next {nxt:<9}  attempts {s.attempts}  <{m.sender}>{kind}"]
    for r in s.recipients:
        lines.append(f"    -> <{r.address}>  {r.status}")
    for engine, reply in s.engine_replies().items():
        lines.append(f"       {engine}: {reply}")
    if e.state_error:
        lines.append(f"       (state unreadable: {e.state_error}; the relay treats it as all pending)")
    return lines


def _list(root: Path, fmt: str, out: TextIO) -> int:
    now = time.time()
    entries = scan(root)
    if fmt == "json":
        json.dump({"spool": str(root), "relay_pid": lock_holder(root), "count": len(entries),
                   "messages": [_entry_json(e, now) for e in entries]}, out, indent=2)
        out.write("\n")
        return EXIT_OK
    if not entries:
        print("queue is empty", file=out)
        return EXIT_OK
    for e in entries:
        print("\n".join(_entry_text(e, now)), file=out)
    total = sum(e.message.size for e in entries)
    print(f"-- {len(entries)} message{'s' if len(entries) != 1 else ''}, {_size(total)}", file=out)
    return EXIT_OK


def _show(root: Path, qid: str, fmt: str, out: TextIO, err: TextIO) -> int:
    entry = read_entry(root, qid)
    if entry is None:
        print(f"routedsl queue: no message {qid} in the queue", file=err)
        return EXIT_PROBLEM
    try:
        headers = read_headers(root, qid).decode("utf-8", "replace")
    except OSError:
        headers = ""
    now = time.time()
    if fmt == "json":
        obj = _entry_json(entry, now)
        obj["headers"] = headers
        json.dump(obj, out, indent=2)
        out.write("\n")
        return EXIT_OK
    m, s = entry.message, entry.state
    print("\n".join(_entry_text(entry, now)), file=out)
    print(f"arrival: {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(m.arrival))}", file=out)
    print(f"next attempt: {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(s.next_attempt))}",
          file=out)
    for r in s.recipients:
        print(f"<{r.address}> {r.status}" + (f" (last status {r.status_code})" if r.status_code else ""),
              file=out)
        for engine, reply in r.replies:
            print(f"    {engine}: {reply}", file=out)
    print("", file=out)
    out.write(headers.replace("\r\n", "\n"))
    return EXIT_OK


# ---------------------------------------------------------------- acting

def _act(root: Path, op: str, qid: Optional[str], wait: float, fmt: str,
         out: TextIO, err: TextIO) -> int:
    if lock_holder(root) is None:
        spool = Spool(root, io_threads=1)
        try:
            spool.open()
        except SpoolBusy:
            pass  # a relay started meanwhile: ask it instead
        except SpoolError as exc:
            print(f"routedsl queue: {exc}", file=err)
            return EXIT_PROBLEM
        else:
            try:
                ok, message = _act_locked(spool, op, qid)
            finally:
                spool.close()
            return _report(ok, message, fmt, out, err)
    answer = submit_request(root, op, qid, timeout=wait)
    if answer is None:
        pid = lock_holder(root)
        print(f"routedsl queue: the relay{f' (pid {pid})' if pid else ''} did not answer within "
              f"{wait:g}s; the request stays in {root / 'control'} and is acted on when it next "
              f"looks", file=err)
        return EXIT_PROBLEM
    return _report(*answer, fmt, out, err)


def _act_locked(spool: Spool, op: str, qid: Optional[str]) -> tuple[bool, str]:
    """Act while holding the spool lock (no relay runs): change the files directly."""
    now = time.time()
    if op == "retry":
        ids = [m.id for m in spool.messages()] if qid is None else [qid]
        done = 0
        for i in ids:
            if spool.get(i) is None:
                return False, f"no message {i} in the queue"
            spool.write_state(dataclasses.replace(spool.state(i), next_attempt=now))
            done += 1
        if qid is None:
            return True, f"{done} message(s) will be delivered as soon as the relay starts"
        return True, f"{qid}: will be delivered as soon as the relay starts"
    assert qid is not None
    if spool.get(qid) is None:
        return False, f"no message {qid} in the queue"
    spool.remove(qid)
    log.warning("%s: deleted by the operator", qid)
    return True, f"{qid}: deleted"


def _report(ok: bool, message: str, fmt: str, out: TextIO, err: TextIO) -> int:
    if fmt == "json":
        json.dump({"ok": ok, "message": message}, out)
        out.write("\n")
    else:
        print(message if ok else f"routedsl queue: {message}", file=out if ok else err)
    return EXIT_OK if ok else EXIT_PROBLEM


if __name__ == "__main__":
    raise SystemExit(main())
