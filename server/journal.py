"""The message journal: the relay's own small messages, committed with one fsync per batch.

A message file of its own costs a create, a rename, an fsync of the file and an unlink,
each a system call that also waits on the file system's journal. Appending the message to
a shared segment file instead lets the committing thread make every message of a batch
durable with one fsync (group commit, as databases do with their logs).

Owns journal/ under the spool root and nothing else:

    journal/SEQ     a segment: 16 hex digits, increasing; appended to, never rewritten

A segment is a run of records:

    envelope line   the same JSON line that starts a msg/ file (id, size, SHA-256, ...),
                    followed by exactly `size` bytes of message data
    D ID\\n          a done mark: message ID left the journal (delivered, bounced, deleted,
                    or copied to msg/ before its first state write)

Rules that keep every acknowledged message:
  * A message is acknowledged only after its segment's fsync (and journal/'s, for a new
    segment). A crash before leaves it unacknowledged: whole (delivered, at worst a
    duplicate) or torn at the segment's end (dropped).
  * A message leaves the journal only through a done mark, and only once the mark is
    durable does its segment count it as gone. The mark may sit in a later segment than
    the message, so segments are deleted oldest first, and only when none of their
    messages is left.
  * At start-up (`replay`), every message without a done mark and not already in msg/
    goes to msg/ the ordinary way; then the segments are deleted. Afterwards the rest of
    the spool sees only msg/ and state/.

Deleting oldest first means one message whose first attempt is slow to end (a next hop
that takes its full timeouts) would keep its segment, and every later one, on disk. So once
more than SEGMENT_LIMIT segments exist, the spool copies the oldest one's remaining
messages to msg/ (server/queue.py, `Spool._relieve`), and the segment can go.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from server.files import unlink_quietly, write_all

log = logging.getLogger("routedsl.queue")

SEGMENT_BYTES = 16 * 1024 * 1024   # a new segment is started once the current one is this big
SEGMENT_LIMIT = 4                  # more segments than this: the oldest one's messages go to msg/
_SEGMENT_RE = re.compile(r"^[0-9A-F]{16}$")
_DONE = b"D "
_MAX_LINE = 4 * 1024 * 1024


@dataclass(slots=True, eq=False)
class Segment:
    seq: int
    fd: int
    size: int = 0
    live: int = 0               # messages in it whose done mark is not yet durable
    announced: bool = False     # its name is durable (journal/ fsynced since it was made)

    @property
    def name(self) -> str:
        return f"{self.seq:016X}"


@dataclass(frozen=True, slots=True)
class Record:
    """A message found in a segment: its envelope line and its data (checked)."""
    id: str
    line: bytes
    data: bytes


@dataclass(slots=True)
class Contents:
    """What the segments hold: the messages without a done mark, oldest first."""
    live: list[Record] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)   # segments with an unreadable record


def segment_names(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if _SEGMENT_RE.match(p.name))
    except FileNotFoundError:
        return []


def _records(blob: bytes) -> Iterator[tuple[str, Optional[Record], Optional[str]]]:
    """("done", None, id) and ("msg", record, None) for each record; stops at the first
    unreadable one after yielding ("bad", None, why)."""
    from server.queue import parse_envelope   # here: server.queue imports this module
    pos = 0
    while pos < len(blob):
        end = blob.find(b"\n", pos, pos + _MAX_LINE)
        if end < 0:
            yield "bad", None, "a record is cut short"
            return
        line = blob[pos:end + 1]
        if line.startswith(_DONE):
            yield "done", None, line[len(_DONE):-1].decode("ascii", "replace")
            pos = end + 1
            continue
        try:
            msg, digest = parse_envelope(line)
        except (ValueError, KeyError, TypeError) as exc:
            yield "bad", None, f"unreadable envelope ({exc})"
            return
        data = blob[end + 1:end + 1 + msg.size]
        if len(data) < msg.size or hashlib.sha256(data).hexdigest() != digest:
            yield "bad", None, f"message {msg.id} is cut short or fails its checksum"
            return
        yield "msg", Record(msg.id, line, data), None
        pos = end + 1 + msg.size


def read(folder: Path) -> Contents:
    """Every message in journal/ without a done mark (read-only: safe while a relay appends,
    since a record being written is simply not there yet)."""
    out = Contents()
    done: set[str] = set()
    found: dict[str, Record] = {}
    for name in segment_names(folder):
        try:
            blob = (folder / name).read_bytes()
        except FileNotFoundError:   # deleted by the relay meanwhile: all of it was done
            continue
        for kind, record, text in _records(blob):
            if kind == "done":
                done.add(text or "")
            elif kind == "msg" and record is not None:
                found.setdefault(record.id, record)
            else:
                log.debug("journal segment %s: %s", name, text)
                out.damaged.append(name)
    out.live = [r for qid, r in found.items() if qid not in done]
    return out


class Journal:
    """The open journal of the relay that holds the spool. Appends happen on the event loop
    (a page-cache write); the caller fsyncs `sync_fds(segment)` in its group commit before
    acknowledging. Not thread-safe: one owner, the loop."""

    def __init__(self, folder: Path, first_seq: int, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        self.dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._next_seq = first_seq
        self._segments: collections.deque[Segment] = collections.deque()
        self._where: dict[str, tuple[Segment, int, int]] = {}   # id -> segment, offset, line length

    def __contains__(self, qid: str) -> bool:
        return qid in self._where

    def __len__(self) -> int:
        return len(self._where)

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    def oldest(self) -> list[str]:
        """The messages still in the oldest segment (when it is not the one appended to)."""
        if len(self._segments) < 2:
            return []
        first = self._segments[0]
        return [qid for qid, (seg, _off, _len) in self._where.items() if seg is first]

    def close(self) -> None:
        for seg in self._segments:
            os.close(seg.fd)
        self._segments.clear()
        self._where.clear()
        os.close(self.dir_fd)

    def sync_fds(self, seg: Segment) -> tuple[int, ...]:
        """What to fsync before an append to `seg` counts: the segment, and journal/ until
        the segment's name is known to be durable."""
        return (seg.fd,) if seg.announced else (seg.fd, self.dir_fd)

    def append(self, qid: str, line: bytes, data: bytes) -> Segment:
        """Append a message (not yet durable). Raises OSError with nothing appended."""
        seg = self._current()
        self._write(seg, (line, data))
        self._where[qid] = (seg, seg.size - len(line) - len(data), len(line))
        seg.live += 1
        return seg

    def mark_done(self, qid: str) -> Segment:
        """Append a done mark for a message in the journal (not yet durable); `settle` it
        once the returned segment is fsynced."""
        seg = self._current()
        self._write(seg, (_DONE + qid.encode("ascii") + b"\n",))
        return seg

    def settle(self, qid: str) -> list[Segment]:
        """A message's done mark is durable (or its append never was): forget it. Returns
        the segments that may now be deleted, oldest first (the caller unlinks them with
        `delete` and fsyncs journal/ after)."""
        entry = self._where.pop(qid, None)
        if entry is not None:
            entry[0].live -= 1
        return self._finished()

    def delete(self, seg: Segment) -> None:
        """Unlink a segment returned by `settle` (any thread; closing is `release`)."""
        unlink_quietly(seg.name, self.dir_fd)

    @staticmethod
    def release(seg: Segment) -> None:
        os.close(seg.fd)

    def read(self, qid: str, size: int) -> tuple[bytes, bytes]:
        """(envelope line, data) of a message still in the journal (blocking; any thread)."""
        seg, offset, line_len = self._where[qid]
        blob = os.pread(seg.fd, line_len + size, offset)
        return blob[:line_len], blob[line_len:]

    # -- plumbing

    def _current(self) -> Segment:
        if self._segments and self._segments[-1].size < self.segment_bytes:
            return self._segments[-1]
        seg = Segment(self._next_seq, -1)
        seg.fd = os.open(seg.name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                         0o600, dir_fd=self.dir_fd)
        self._next_seq += 1
        self._segments.append(seg)
        return seg

    def _finished(self) -> list[Segment]:
        out = []
        while len(self._segments) > 1 and self._segments[0].live == 0:
            out.append(self._segments.popleft())
        return out

    @staticmethod
    def _write(seg: Segment, chunks: tuple[bytes, ...]) -> None:
        try:
            write_all(seg.fd, chunks)
        except BaseException:
            # a record cut short would end the segment for start-up's reading: cut it off
            os.ftruncate(seg.fd, seg.size)
            raise
        seg.size += sum(len(c) for c in chunks)
