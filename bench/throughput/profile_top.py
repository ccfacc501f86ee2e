"""Where the time goes: top functions of py-spy collapsed stacks (``--format raw`` files).

    python bench/throughput/profile_top.py PROFILE.txt [...] [--top 25] [--filter TEXT]

Prints, per function, the share of samples in which it is on the stack (inclusive) and at
the top of the stack (self). Several files are summed. Never samples anything itself.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``file.py:func`` with the path trimmed to the package."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{m.group('func')}"


def load(paths: list[Path], only: str = "") -> tuple[collections.Counter[str], collections.Counter[str], int]:
    inclusive: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            if only and only not in stack:
                continue
            frames = [_name(f) for f in stack.split(";") if f and not f.startswith("process ")
                      and not f.startswith("thread ")]
            if not frames:
                continue
            total += n
            for f in set(frames):
                inclusive[f] += n
            self_[frames[-1]] += n
    return inclusive, self_, total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="top functions of py-spy raw profiles")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--filter", default="", help="only functions whose name contains this")
    p.add_argument("--only", default="", metavar="TEXT",
                   help="only stacks containing TEXT, e.g. runners.py for the event-loop thread")
    args = p.parse_args(argv)
    inclusive, self_, total = load(args.files, args.only)
    if not total:
        print("no samples")
        return 1
    print(f"{total} samples\n\nself %  function")
    for f, n in [x for x in self_.most_common() if args.filter in x[0]][: args.top]:
        print(f"{100 * n / total:6.1f}  {f}")
    print("\nincl %  function")
    for f, n in [x for x in inclusive.most_common() if args.filter in x[0]][: args.top]:
        print(f"{100 * n / total:6.1f}  {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
