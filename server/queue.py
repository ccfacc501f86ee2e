"""The durable spool: the relay's source of truth for every accepted message.

Owns the on-disk queue and nothing else: committing messages (temp file, fsync, rename,
fsync of the folder — only then is a message acknowledged), per-recipient delivery state,
crash recovery at start-up, the one-relay-per-spool lock, and the control folder through
which `routedsl queue` talks to a running relay. It never speaks SMTP, never routes and
never decides what a delivery outcome means (that is server/scheduler.py and
server/outcome.py).

Layout under the spool root (Postfix's "queue state = directory", OpenSMTPD's commit by
rename):

    lock              flock'ed by the relay that owns the spool; holds its pid
    tmp/              files being written; never acknowledged; dropped at start-up
    journal/SEQ       the relay's own small messages, appended, until their first attempt
                      ends (server/journal.py); moved to msg/ at start-up
    msg/ID            one committed message: a JSON envelope line, then the raw bytes
    state/ID.json     per-recipient state (versioned JSON); absent = every recipient pending
    corrupt/          quarantine for torn or unparseable files (never silently deleted)
    control/          requests from `routedsl queue` (NAME.req) and the relay's answers (NAME.res)

The relay's own commits (`accept`, with `use_journal=True`) append a small message to the
journal from the event loop itself (a page-cache write costs less than a round trip through
a thread); the committing thread (server/group_commit.py) then fsyncs the journal once for
every message, removal and state write of its batch (group commit). A message is
acknowledged only after that fsync. It leaves the journal with a done mark when its first
attempt finishes it, or is copied to msg/ before its first state write: only messages that
wait, or whose recipients differ in outcome, ever get files of their own. Without the
journal (an SMTP intake process's commits, messages over 128 KiB, and `put`), a message is
written to tmp/, renamed into msg/, and acknowledged only after the file's fsync and then
msg/'s. Either way a crash before the acknowledgement leaves a message nobody was told
about: whole (delivered, at worst a duplicate) or torn (dropped or quarantined at
start-up). The first delivery attempt of a message just accepted uses the bytes still in
memory (bounded); later attempts read the journal or the file.

The envelope line carries the data's size and SHA-256, so a torn or altered message is
detected (at start-up by size, before delivery by checksum) and quarantined. State files
are replaced atomically (temp + fsync + rename + fsync of state/), so a reader sees the old
state or the new one, never half of either. A message is removed by unlinking msg/ID first
(then state/ID.json): a crash in between leaves an orphan state file, which start-up
discards; the reverse order could resurrect a finished message.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional

from server import journal
from server.files import unlink_quietly as _unlink_quietly, write_all as _write_all
from server.group_commit import GroupCommit

log = logging.getLogger("routedsl.queue")

FORMAT_VERSION = 1
Kind = Literal["mail", "bounce", "delay"]
Status = Literal["pending", "delivered", "failed"]
KINDS: tuple[str, ...] = ("mail", "bounce", "delay")
STATUSES: tuple[str, ...] = ("pending", "delivered", "failed")
_ID_RE = re.compile(r"^[0-9A-F]{20}$")
_REQ_RE = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
_MAX_HEADER_LINE = 4 * 1024 * 1024  # an envelope line longer than this is corrupt
# A write failing with one of these means the disk (or quota) is full: 452 4.3.1, not 451.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
FRESH_LIMIT = 32 * 1024 * 1024      # bytes of just-accepted messages kept for their first attempt
INLINE_WRITE_LIMIT = 128 * 1024     # `accept` writes a message this small from the event loop


class SpoolError(Exception):
    """A spool problem worth a clear one-line message (never a traceback to a user)."""


class SpoolBusy(SpoolError):
    """Another process holds the spool lock."""

    def __init__(self, root: Path, pid: Optional[int]) -> None:
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"spool {root} is in use by {who}")


class CorruptMessage(SpoolError):
    """A committed message failed its checksum and was moved to corrupt/."""


def is_queue_id(text: str) -> bool:
    return bool(_ID_RE.match(text))


def new_queue_id() -> str:
    """20 upper-case hex digits: microseconds since the epoch, then 24 random bits.

    Sorting ids sorts by arrival; the random tail keeps ids unique across processes. It
    needs no secrecy, so `random` (reseeded in each forked child) spares the loop a
    getrandom call per message.
    """
    return f"{time.time_ns() // 1000:014X}{random.getrandbits(24):06X}"


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """The envelope of one committed message (its bytes stay on disk until delivery)."""
    id: str
    sender: str                      # '' is the null sender
    recipients: tuple[str, ...]
    size: int
    arrival: float
    smtputf8: bool = False
    kind: str = "mail"               # mail | bounce | delay; only "mail" may ever be bounced


@dataclass(frozen=True, slots=True)
class RecipientState:
    address: str
    status: str = "pending"          # pending | delivered | failed
    replies: tuple[tuple[str, str], ...] = ()   # (engine, its last cleaned reply), first tried first
    status_code: Optional[str] = None           # enhanced status of the last reply, e.g. "4.4.1"
    remote: Optional[str] = None                # the host that gave the last reply, if known

    @property
    def final(self) -> bool:
        return self.status != "pending"

    def with_reply(self, engine: str, reply: str, status_code: Optional[str],
                   remote: Optional[str]) -> "RecipientState":
        replies = tuple((e, r) for e, r in self.replies if e != engine) + ((engine, reply),)
        return dataclasses.replace(self, replies=replies, status_code=status_code, remote=remote)

    @property
    def last_reply(self) -> Optional[str]:
        return self.replies[-1][1] if self.replies else None


@dataclass(frozen=True, slots=True)
class MessageState:
    """Everything the scheduler knows about a message's progress; written before acted on."""
    id: str
    recipients: tuple[RecipientState, ...]
    first_arrival: float
    attempts: int = 0
    next_attempt: float = 0.0
    delay_notified: bool = False
    version: int = FORMAT_VERSION

    @classmethod
    def initial(cls, msg: QueuedMessage) -> "MessageState":
        return cls(id=msg.id, recipients=tuple(RecipientState(r) for r in msg.recipients),
                   first_arrival=msg.arrival, next_attempt=msg.arrival)

    def recipient(self, address: str) -> RecipientState:
        for r in self.recipients:
            if r.address == address:
                return r
        raise KeyError(address)

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(r.address for r in self.recipients if r.status == "pending")

    @property
    def done(self) -> bool:
        return all(r.final for r in self.recipients)

    def update(self, changed: Iterable[RecipientState], **fields: object) -> "MessageState":
        new = {r.address: r for r in changed}
        recipients = tuple(new.get(r.address, r) for r in self.recipients)
        return dataclasses.replace(self, recipients=recipients, **fields)  # type: ignore[arg-type]

    def engine_replies(self) -> dict[str, str]:
        """Last reply per engine over all recipients still waiting (or all, when none wait)."""
        waiting = [r for r in self.recipients if r.status == "pending"] or list(self.recipients)
        out: dict[str, str] = {}
        for r in waiting:
            for engine, reply in r.replies:
                out[engine] = reply
        return out

    def to_json(self) -> dict:
        return {
            "version": self.version, "id": self.id, "attempts": self.attempts,
            "next_attempt": self.next_attempt, "first_arrival": self.first_arrival,
            "delay_notified": self.delay_notified,
            "recipients": [
                {"address": r.address, "status": r.status,
                 "replies": {e: t for e, t in r.replies},
                 "status_code": r.status_code, "remote": r.remote}
                for r in self.recipients],
        }

    @classmethod
    def from_json(cls, obj: dict) -> "MessageState":
        if not isinstance(obj, dict) or obj.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported state version {obj.get('version') if isinstance(obj, dict) else obj!r}")
        recipients = []
        for r in obj["recipients"]:
            if r["status"] not in STATUSES:
                raise ValueError(f"unknown status {r['status']!r}")
            replies = r.get("replies") or {}
            if not isinstance(replies, dict):
                raise ValueError("replies is not an object")
            recipients.append(RecipientState(
                address=str(r["address"]), status=r["status"],
                replies=tuple((str(e), str(t)) for e, t in replies.items()),
                status_code=r.get("status_code"), remote=r.get("remote")))
        return cls(id=str(obj["id"]), recipients=tuple(recipients),
                   first_arrival=float(obj["first_arrival"]), attempts=int(obj["attempts"]),
                   next_attempt=float(obj["next_attempt"]),
                   delay_notified=bool(obj["delay_notified"]))


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """One request dropped into control/ by `routedsl queue` for the running relay."""
    name: str
    op: str                 # "retry" | "delete"
    id: Optional[str]       # None with op "retry" means every message


# ---------------------------------------------------------------- low-level file helpers

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_folder(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _create_file(path: Path | str, chunks: Iterable[bytes], dir_fd: Optional[int] = None) -> int:
    """Create `path` (must not exist; relative to `dir_fd` when given) and write it, not
    fsynced; returns the open descriptor. On any error the file is removed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        _write_all(fd, chunks)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path, dir_fd)
        raise
    return fd


def _write_file(path: Path, chunks: Iterable[bytes]) -> None:
    """Create `path` (must not exist), write and fsync it. On any error the file is removed."""
    fd = _create_file(path, chunks)
    try:
        os.fsync(fd)
    except BaseException:
        _unlink_quietly(path)
        raise
    finally:
        os.close(fd)


def envelope_line(msg: QueuedMessage, digest: str) -> bytes:
    obj = {"version": FORMAT_VERSION, "id": msg.id, "kind": msg.kind, "sender": msg.sender,
           "recipients": list(msg.recipients), "smtputf8": msg.smtputf8,
           "arrival": msg.arrival, "size": msg.size, "sha256": digest}
    # ensure_ascii keeps the line ASCII even for SMTPUTF8 addresses (and escapes any surrogates)
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def parse_envelope(line: bytes) -> tuple[QueuedMessage, str]:
    obj = json.loads(line)
    if not isinstance(obj, dict) or obj.get("version") != FORMAT_VERSION:
        raise ValueError("unsupported message version")
    kind = obj["kind"]
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    recipients = obj["recipients"]
    if not isinstance(recipients, list) or not recipients:
        raise ValueError("no recipients")
    msg = QueuedMessage(id=str(obj["id"]), sender=str(obj["sender"]),
                        recipients=tuple(str(r) for r in recipients), size=int(obj["size"]),
                        arrival=float(obj["arrival"]), smtputf8=bool(obj["smtputf8"]), kind=kind)
    return msg, str(obj["sha256"])


def read_envelope(path: Path) -> tuple[QueuedMessage, str, int]:
    """(message, sha256, offset of the data) from a committed file; ValueError if torn."""
    with open(path, "rb") as f:
        line = f.readline(_MAX_HEADER_LINE)
        if not line.endswith(b"\n"):
            raise ValueError("envelope line is incomplete")
        msg, digest = parse_envelope(line)
        total = os.fstat(f.fileno()).st_size
    if msg.id != path.name:
        raise ValueError(f"envelope id {msg.id} does not match the file name")
    if total != len(line) + msg.size:
        raise ValueError(f"file has {total - len(line)} bytes of data, envelope says {msg.size}")
    return msg, digest, len(line)


def read_state_file(path: Path) -> MessageState:
    with open(path, "rb") as f:
        return MessageState.from_json(json.loads(f.read()))


# ---------------------------------------------------------------- the spool

class Spool:
    """One spool folder. `open()` before use; one relay per spool (flock on `lock`).

    Blocking methods (`put`, `write_state`, `remove`, `read_data`, ...) are for threads and
    tools; the relay's event loop uses the async ones (`accept`, `record`, `finish`, `load`).
    Their durable changes go through one committing thread in batches (group commit:
    server/group_commit.py), their reads through the spool's own thread pool.
    """

    def __init__(self, root: Path | str, *, io_threads: int = 16, use_journal: bool = False) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.journal_dir = self.root / "journal"
        self.msg_dir = self.root / "msg"
        self.state_dir = self.root / "state"
        self.corrupt_dir = self.root / "corrupt"
        self.control_dir = self.root / "control"
        self.lock_path = self.root / "lock"
        self._io_threads = io_threads
        self._executor: Optional[ThreadPoolExecutor] = None
        self._group: Optional[GroupCommit] = None
        self._lock_fd: Optional[int] = None
        # the relay's own spool commits its small messages to the journal (server/journal.py)
        self._use_journal = use_journal
        self._journal: Optional[journal.Journal] = None
        self._journal_seq = 1
        # journaled messages an attempt is reading or taking out (the relief leaves them),
        # and those the relief is copying to msg/ (an attempt's step waits for it first)
        self._touching: set[str] = set()
        self._moving: dict[str, "asyncio.Future[None]"] = {}
        self._relief: Optional["asyncio.Task[None]"] = None
        # tmp/, msg/ and state/ stay open while the spool is: fsyncing one is then one
        # system call, and a message's files are named relative to them
        self._tmp_fd = -1
        self._msg_fd = -1
        self._state_fd = -1
        self._messages: dict[str, QueuedMessage] = {}
        self._states: dict[str, MessageState] = {}
        self._bytes = 0
        # ids whose state/ID.json may exist (absent: nothing to unlink when they finish)
        self._state_files: set[str] = set()
        # the bytes of messages just accepted, kept for their first delivery attempt so it
        # neither re-reads nor re-hashes the file; bounded, and dropped once loaded
        self._fresh: dict[str, bytes] = {}
        self._fresh_bytes = 0
        self.fresh_limit = FRESH_LIMIT
        # what `accept` does with a message once it is durable: the relay's own spool adopts
        # it; an SMTP intake process's spool hands it to the relay's process instead
        self._hand_over: Callable[[QueuedMessage, bytes], None] = self.adopt

    # -- lifecycle

    def open(self) -> list[QueuedMessage]:
        """Lock the spool, recover what a crash left, return the waiting messages (oldest first).

        Raises SpoolBusy when another process holds the lock, SpoolError when the folder
        cannot be used.
        """
        try:
            for d in (self.root, self.tmp_dir, self.journal_dir, self.msg_dir, self.state_dir,
                      self.corrupt_dir, self.control_dir):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot use spool {self.root}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(self.root, lock_holder(self.root)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        self._start_io()
        self._drop_temp_files()
        self._replay_journal()
        self._recover()
        if self._use_journal:
            self._journal = journal.Journal(self.journal_dir, self._journal_seq)
        return self.messages()

    def open_for_intake(self, hand_over: Callable[[QueuedMessage, bytes], None]) -> None:
        """Commit-only use by an SMTP intake process of the relay that holds the lock
        (server/intake_processes.py): no lock, no recovery, no index; `accept` commits the
        message durably, then calls `hand_over(msg, data)`, which tells the relay's process.
        """
        self._start_io()
        self._hand_over = hand_over

    def _start_io(self) -> None:
        self._executor = ThreadPoolExecutor(self._io_threads, thread_name_prefix="spool-io")
        self._group = GroupCommit()
        self._tmp_fd = _open_folder(self.tmp_dir)
        self._msg_fd = _open_folder(self.msg_dir)
        self._state_fd = _open_folder(self.state_dir)

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for fd in (self._tmp_fd, self._msg_fd, self._state_fd):
            if fd >= 0:
                os.close(fd)
        self._tmp_fd = self._msg_fd = self._state_fd = -1
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> "Spool":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recovery

    def _replay_journal(self) -> None:
        """Move every message the journal still holds (no done mark, not yet in msg/) to
        msg/, durably, then delete the segments: afterwards only msg/ and state/ matter."""
        names = journal.segment_names(self.journal_dir)
        if not names:
            return
        contents = journal.read(self.journal_dir)
        moved = 0
        for rec in contents.live:
            if _is_whole(self.msg_dir / rec.id):
                continue   # copied to msg/ before its done mark was durable
            self._write_and_sync(parse_envelope(rec.line)[0], rec.data)
            moved += 1
        os.fsync(self._msg_fd)
        for name in names:
            if name in contents.damaged:
                self._quarantine(self.journal_dir / name, "a journal record is torn or unreadable "
                                 "(the messages before it were recovered)")
            else:
                _unlink_quietly(self.journal_dir / name)
        fsync_dir(self.journal_dir)
        self._journal_seq = int(names[-1], 16) + 1
        log.info("journal: %d message(s) moved to msg/, %d segment(s) emptied", moved, len(names))

    def _drop_temp_files(self) -> None:
        # first: a copy to msg/ that a crash cut short must not block the journal's replay
        for p in sorted(self.tmp_dir.iterdir()):
            log.warning("dropped unfinished temp file %s (it was never acknowledged)", p.name)
            _unlink_quietly(p)

    def _recover(self) -> None:
        self._messages.clear()
        self._states.clear()
        self._state_files.clear()
        self._bytes = 0
        for p in sorted(self.msg_dir.iterdir()):
            if not is_queue_id(p.name) or not p.is_file():
                self._quarantine(p, "not a queue file name")
                continue
            try:
                msg, _digest, _offset = read_envelope(p)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._quarantine(p, f"torn or unreadable message: {exc}")
                _unlink_quietly(self.state_dir / f"{p.name}.json")
                continue
            self._register(msg)
        for p in sorted(self.state_dir.iterdir()):
            qid = p.name.removesuffix(".json")
            msg = self._messages.get(qid)
            if msg is None or not p.name.endswith(".json"):
                # the message was finished (msg/ is unlinked first) or never existed
                log.info("removed state file %s without a message", p.name)
                _unlink_quietly(p)
                continue
            try:
                state = read_state_file(p)
                if state.id != qid or [r.address for r in state.recipients] != list(msg.recipients):
                    raise ValueError("state does not match its message")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._quarantine(p, f"torn or unreadable state ({exc}); message {qid} "
                                    f"recovered with every recipient pending")
                self._state_files.add(qid)   # the move may have failed: unlink at the end
                continue
            self._states[qid] = state
            self._state_files.add(qid)
        for qid, msg in list(self._messages.items()):
            state = self._states.get(qid)
            if state is not None and state.done:
                # every recipient was final but the crash came before the removal
                self.remove(qid)
        if self._messages:
            log.info("spool %s: %d message(s) waiting", self.root, len(self._messages))

    def _quarantine(self, path: Path, why: str) -> None:
        dest = self.corrupt_dir / f"{path.name}.{time.time_ns()}"
        try:
            os.replace(path, dest)
            fsync_dir(self.corrupt_dir)
        except OSError as exc:
            log.error("could not quarantine %s (%s): %s", path, why, exc)
            return
        log.error("quarantined %s to %s: %s", path.relative_to(self.root), dest.name, why)

    # -- reading

    def __len__(self) -> int:
        """How many messages wait (cheap: for queue-size limits and status)."""
        return len(self._messages)

    @property
    def total_bytes(self) -> int:
        """The summed size of the waiting messages' data."""
        return self._bytes

    def messages(self) -> list[QueuedMessage]:
        return sorted(self._messages.values(), key=lambda m: (m.arrival, m.id))

    def get(self, qid: str) -> Optional[QueuedMessage]:
        return self._messages.get(qid)

    def state(self, qid: str) -> MessageState:
        state = self._states.get(qid)
        if state is None:
            state = MessageState.initial(self._messages[qid])
        return state

    def read_data(self, qid: str) -> bytes:
        """The message bytes, checked against the envelope's SHA-256 (blocking)."""
        if self._journal is not None and qid in self._journal:
            return self._read_journaled(qid)
        path = self.msg_dir / qid
        with open(path, "rb") as f:
            line = f.readline(_MAX_HEADER_LINE)
            _msg, digest = parse_envelope(line)
            data = f.read()
        if hashlib.sha256(data).hexdigest() != digest:
            self._quarantine(path, "checksum mismatch")
            _unlink_quietly(self.state_dir / f"{qid}.json")
            self._forget(qid)
            raise CorruptMessage(f"message {qid} failed its checksum and was quarantined")
        return data

    def _read_journaled(self, qid: str) -> bytes:
        """A message's bytes from the journal, checked (blocking). On a mismatch a copy goes
        to corrupt/ and CorruptMessage is raised; `load` then takes it out of the journal."""
        assert self._journal is not None
        line, data = self._journal.read(qid, self._messages[qid].size)
        _msg, digest = parse_envelope(line)
        if hashlib.sha256(data).hexdigest() != digest:
            dest = self.corrupt_dir / f"{qid}.journal.{time.time_ns()}"
            _write_file(dest, (line, data))
            log.error("message %s in the journal failed its checksum; a copy is in corrupt/%s",
                      qid, dest.name)
            raise CorruptMessage(f"message {qid} failed its checksum and was quarantined")
        return data

    async def load(self, qid: str) -> bytes:
        """The message bytes: those just accepted for a first attempt, else read and checked."""
        data = self._fresh.pop(qid, None)
        if data is not None:
            self._fresh_bytes -= len(data)
            return data
        if await self._in_journal(qid):
            with self._touched(qid):
                try:
                    return await self._run(self._read_journaled, qid)
                except CorruptMessage:
                    await self._leave_journal(qid)
                    self._forget(qid)
                    raise
        return await self._run(self.read_data, qid)

    # -- committing messages

    @staticmethod
    def _new_message(sender: str, recipients: Iterable[str], data: bytes,
                     smtputf8: bool, kind: str) -> QueuedMessage:
        if kind not in KINDS:
            raise ValueError(f"unknown message kind {kind!r}")
        rcpts = tuple(recipients)
        if not rcpts:
            raise ValueError("a message needs at least one recipient")
        return QueuedMessage(id=new_queue_id(), sender=sender, recipients=rcpts,
                             size=len(data), arrival=time.time(), smtputf8=smtputf8, kind=kind)

    def _write_message(self, msg: QueuedMessage, data: bytes) -> int:
        """Write the message into tmp/ and rename it into msg/, not yet fsynced. Returns its
        open descriptor, which `_sync_file` then fsyncs and closes.

        The caller acknowledges only after the file's and the folder's fsync; a crash before
        leaves a message that was never acknowledged (whole, or torn and quarantined at
        start-up).
        """
        line = envelope_line(msg, hashlib.sha256(data).hexdigest())
        # names relative to the open folders: no path to build, none for the kernel to walk
        fd = _create_file(msg.id, (line, data), self._tmp_fd)
        try:
            os.replace(msg.id, msg.id, src_dir_fd=self._tmp_fd, dst_dir_fd=self._msg_fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(msg.id, self._tmp_fd)
            raise
        return fd

    def _sync_file(self, msg: QueuedMessage, fd: int) -> QueuedMessage:
        """fsync and close a file from `_write_message`; the caller fsyncs msg/ after. On a
        journalling file system the file's fsync commits the rename too, so the folder's
        finds little left to do. On failure the message is removed: never acknowledged."""
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            self._rollback(msg.id)
            raise
        return msg

    def _write_and_sync(self, msg: QueuedMessage, data: bytes) -> QueuedMessage:
        return self._sync_file(msg, self._write_message(msg, data))

    def put(self, sender: str, recipients: Iterable[str], data: bytes, *,
            smtputf8: bool = False, kind: str = "mail") -> QueuedMessage:
        """Commit one message durably (blocking). When this returns, the message survives a crash.

        Raises OSError (e.g. ENOSPC) with nothing left behind.
        """
        msg = self._write_and_sync(self._new_message(sender, recipients, data, smtputf8, kind), data)
        try:
            os.fsync(self._msg_fd)
        except OSError:
            self._rollback(msg.id)
            raise
        self._register(msg)
        return msg

    async def accept(self, sender: str, recipients: Iterable[str], data: bytes, *,
                     smtputf8: bool = False, kind: str = "mail") -> QueuedMessage:
        """`put` for the event loop.

        Returns only after this message is durable. If the caller is cancelled (client gone),
        the commit still completes and the message is registered for delivery: it was never
        acknowledged, so delivering it is at worst a duplicate, never a loss.
        """
        task = asyncio.ensure_future(self._accept(sender, tuple(recipients), data, smtputf8, kind))
        # if the caller is gone, its failure is still logged once, not "never retrieved"
        task.add_done_callback(_log_orphan_failure)
        return await asyncio.shield(task)

    async def _accept(self, sender: str, recipients: tuple[str, ...], data: bytes,
                      smtputf8: bool, kind: str) -> QueuedMessage:
        # A small message is written and renamed from the loop (a few page-cache calls
        # cost less than a thread hop); the committing thread fsyncs it, and msg/ once for
        # its whole batch. A larger one is written there too.
        group = self._committer()
        msg = self._new_message(sender, recipients, data, smtputf8, kind)
        if self._journal is not None and len(data) <= INLINE_WRITE_LIMIT:
            seg = self._journal.append(msg.id, envelope_line(msg, hashlib.sha256(data).hexdigest()), data)
            try:
                await group.submit(_nothing, folders=self._journal.sync_fds(seg))
            except BaseException:
                self._drop_from_journal(msg.id)
                raise
            seg.announced = True
            self._hand_over(msg, data)
            if self._journal.segment_count > journal.SEGMENT_LIMIT and self._relief is None:
                self._relief = asyncio.ensure_future(self._relieve())
            return msg
        if len(data) <= INLINE_WRITE_LIMIT:
            work = functools.partial(self._sync_file, msg, self._write_message(msg, data))
        else:
            work = functools.partial(self._write_and_sync, msg, data)
        await group.submit(work, folders=(self._msg_fd,),
                           undo=functools.partial(self._rollback, msg.id))
        self._hand_over(msg, data)
        return msg

    def adopt(self, msg: QueuedMessage, data: Optional[bytes] = None) -> None:
        """Index a message committed by `accept` (here or in an intake process), keeping
        its bytes, when given and within the bound, for the first delivery attempt."""
        self._register(msg)
        if data is not None and self._fresh_bytes + msg.size <= self.fresh_limit:
            self._fresh[msg.id] = data
            self._fresh_bytes += msg.size

    def _rollback(self, qid: str) -> None:
        _unlink_quietly(qid, self._msg_fd)

    def _register(self, msg: QueuedMessage) -> None:
        if msg.id not in self._messages:
            self._bytes += msg.size
        self._messages[msg.id] = msg

    def _forget(self, qid: str) -> None:
        msg = self._messages.pop(qid, None)
        if msg is not None:
            self._bytes -= msg.size
        self._states.pop(qid, None)
        self._state_files.discard(qid)
        data = self._fresh.pop(qid, None)
        if data is not None:
            self._fresh_bytes -= len(data)

    # -- state

    def _replace_state_file(self, state: MessageState) -> None:
        """Write state/ID.json anew (the file fsynced, state/ not yet)."""
        body = json.dumps(state.to_json(), ensure_ascii=True, indent=1).encode("ascii") + b"\n"
        tmp = self.tmp_dir / f"{state.id}.{secrets.token_hex(4)}.state"
        _write_file(tmp, (body,))
        try:
            os.replace(tmp, self.state_dir / f"{state.id}.json")
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def _write_state_file(self, state: MessageState) -> None:
        self._replace_state_file(state)
        os.fsync(self._state_fd)

    def write_state(self, state: MessageState) -> None:
        """Replace a message's state durably (blocking); the in-memory copy follows."""
        if state.id not in self._messages:
            raise KeyError(state.id)
        self._state_files.add(state.id)
        self._write_state_file(state)
        self._states[state.id] = state

    async def record(self, state: MessageState) -> None:
        """`write_state` for the event loop (in the committing thread, state/ fsynced once
        per batch); returns once the new state is durable. A message still in the journal
        is first copied to msg/: a state file always has its message file.

        Writes for one message must not overlap (the scheduler serialises them per message).
        """
        if state.id not in self._messages:
            raise KeyError(state.id)
        group = self._committer()
        if await self._in_journal(state.id):
            with self._touched(state.id):
                await self._move_to_msg(state.id)
        self._state_files.add(state.id)
        await group.submit(functools.partial(self._replace_state_file, state),
                           folders=(self._state_fd,))
        self._states[state.id] = state

    def note(self, state: MessageState) -> None:
        """Replace a message's state in memory only: for a step that changed nothing a crash
        must remember (temporary failures only); the next `record` writes it with the rest."""
        if state.id not in self._messages:
            raise KeyError(state.id)
        self._states[state.id] = state

    def set_schedule(self, qid: str, next_attempt: float) -> None:
        """Change when a message is next due, in memory only (the relay's `retry`)."""
        self._states[qid] = dataclasses.replace(self.state(qid), next_attempt=next_attempt)

    # -- removal

    def remove(self, qid: str) -> None:
        """Drop a message whose recipients are all final, or that an operator deleted (blocking)."""
        _unlink_quietly(qid, self._msg_fd)
        os.fsync(self._msg_fd)
        self._unlink_state(qid)
        self._forget(qid)

    def _unlink_state(self, qid: str) -> None:
        # only after msg/ID is gone for good (see the removal order above)
        _unlink_quietly(self.state_dir / f"{qid}.json")

    async def finish(self, qid: str) -> None:
        """`remove` for the event loop, in the committing thread (msg/ fsynced once per
        batch); state/ID.json is unlinked only when one was ever written. A message still
        in the journal gets a done mark instead."""
        if await self._in_journal(qid):
            with self._touched(qid):
                await self._leave_journal(qid)
            self._forget(qid)
            return
        after = functools.partial(self._unlink_state, qid) if qid in self._state_files else None
        await self._committer().submit(functools.partial(_unlink_quietly, qid, self._msg_fd),
                                       folders=(self._msg_fd,), after=after)
        self._forget(qid)

    # -- the journal

    async def _in_journal(self, qid: str) -> bool:
        """Is the message still in the journal? Waits first for its copy to msg/ by the
        relief, if one is under way. The caller then enters `_touched` before its next
        await, so the relief leaves it alone."""
        moving = self._moving.get(qid)
        if moving is not None:
            await asyncio.shield(moving)
        return self._journal is not None and qid in self._journal

    @contextlib.contextmanager
    def _touched(self, qid: str) -> Iterator[None]:
        """An attempt's step on a journaled message: the relief leaves the message alone."""
        self._touching.add(qid)
        try:
            yield
        finally:
            self._touching.discard(qid)

    async def _relieve(self) -> None:
        """Copy the oldest segment's remaining messages to msg/ while there are more than
        SEGMENT_LIMIT segments, so one slow first attempt cannot hold the journal's disk
        space. Messages an attempt is reading or taking out are left; the next commit past
        the limit tries again."""
        try:
            while self._journal is not None and self._journal.segment_count > journal.SEGMENT_LIMIT:
                ids = [q for q in self._journal.oldest()
                       if q in self._messages and q not in self._touching]
                if not ids:
                    return
                for qid in ids:
                    if qid in self._touching or qid not in self._journal:
                        continue   # an attempt took it out, or is at it, meanwhile
                    moved = asyncio.get_running_loop().create_future()
                    self._moving[qid] = moved
                    try:
                        await self._move_to_msg(qid)
                    finally:
                        del self._moving[qid]
                        moved.set_result(None)
        except (OSError, SpoolError) as exc:
            log.warning("journal: could not move the oldest segment's messages to msg/: %s", exc)
        finally:
            self._relief = None

    async def _leave_journal(self, qid: str) -> None:
        """Take a message out of the journal: a done mark, durable when this returns."""
        assert self._journal is not None
        seg = self._journal.mark_done(qid)
        await self._committer().submit(_nothing, folders=self._journal.sync_fds(seg))
        seg.announced = True
        self._delete_segments(self._journal.settle(qid))

    def _drop_from_journal(self, qid: str) -> None:
        """A message whose commit failed: never acknowledged, so a done mark is written
        without waiting for it (were it lost, a restart would deliver the message anyway)."""
        assert self._journal is not None
        try:
            self._journal.mark_done(qid)
        except OSError as exc:
            log.warning("journal: no done mark for refused message %s: %s", qid, exc)
        self._delete_segments(self._journal.settle(qid))

    def _delete_segments(self, segments: list[journal.Segment]) -> None:
        """Unlink emptied segments in the committing thread, oldest first (a later segment
        may hold the done marks of an earlier one's messages)."""
        if not segments:
            return
        j, group = self._journal, self._committer()
        assert j is not None
        for seg in segments:
            future = group.submit(functools.partial(j.delete, seg), folders=(j.dir_fd,),
                                  after=functools.partial(j.release, seg))
            future.add_done_callback(_log_segment_failure)

    async def _move_to_msg(self, qid: str) -> None:
        """Copy a journaled message to msg/ (durably), then take it out of the journal."""
        msg = self._messages[qid]
        data = await self._run(self._read_journaled, qid)
        await self._committer().submit(functools.partial(self._write_and_sync, msg, data),
                                       folders=(self._msg_fd,),
                                       undo=functools.partial(self._rollback, msg.id))
        await self._leave_journal(qid)

    # -- control requests (from `routedsl queue` while this relay holds the lock)

    def requests(self) -> list[ControlRequest]:
        """Pending control requests, oldest first (blocking; cheap when there are none)."""
        out = []
        for p in sorted(self.control_dir.glob("*.req")):
            name = p.name.removesuffix(".req")
            if not _REQ_RE.match(name):
                self._quarantine(p, "not a control request name")
                continue
            try:
                obj = json.loads(p.read_bytes())
                op, qid = obj["op"], obj.get("id")
                if op not in ("retry", "delete") or (qid is not None and not is_queue_id(qid)) \
                        or (op == "delete" and qid is None):
                    raise ValueError(f"bad request {obj!r}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                if p.exists():
                    self.answer(ControlRequest(name, "invalid", None), False,
                                f"unreadable request: {exc}")
                continue
            out.append(ControlRequest(name, op, qid))
        return out

    def answer(self, req: ControlRequest, ok: bool, message: str) -> None:
        body = json.dumps({"ok": ok, "message": message}).encode() + b"\n"
        tmp = self.tmp_dir / f"{req.name}.res"
        _unlink_quietly(tmp)
        _write_file(tmp, (body,))
        os.replace(tmp, self.control_dir / f"{req.name}.res")
        _unlink_quietly(self.control_dir / f"{req.name}.req")

    async def take_requests(self) -> list[ControlRequest]:
        return await self._run(self.requests)

    async def answer_async(self, req: ControlRequest, ok: bool, message: str) -> None:
        await self._run(self.answer, req, ok, message)

    # -- plumbing

    def _committer(self) -> GroupCommit:
        if self._group is None:
            raise SpoolError(f"spool {self.root} is not open")
        return self._group

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        if self._executor is None:
            raise SpoolError(f"spool {self.root} is not open")
        return await _in_thread(self._executor, fn, *args)


def _in_thread(executor: ThreadPoolExecutor, fn, *args) -> "asyncio.Future":  # type: ignore[no-untyped-def]
    """`loop.run_in_executor` without its per-call check that `fn` is not a coroutine
    function (an `inspect` walk, ~3 % of the loop under load: several spool calls a message)."""
    return asyncio.wrap_future(executor.submit(fn, *args))


def _nothing() -> None:
    """The work of a group-commit job that only needs its folders fsynced."""


def _log_segment_failure(future: "asyncio.Future[None]") -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("journal: could not delete an emptied segment: %s", future.exception())


def _log_orphan_failure(task: "asyncio.Future[QueuedMessage]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("commit failed: %s", task.exception())


# ---------------------------------------------------------------- for tools (no lock needed)

def lock_holder(root: Path | str) -> Optional[int]:
    """The pid of the relay holding the spool, or None when nobody holds it."""
    path = Path(root) / "lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Entry:
    """A message as a reader sees it on disk: envelope and state (or why the state is unreadable)."""
    message: QueuedMessage
    state: MessageState
    state_error: Optional[str] = None


def _is_whole(path: Path) -> bool:
    try:
        read_envelope(path)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _journaled(root: Path | str) -> dict[str, journal.Record]:
    """The messages in journal/ (waiting for, or in, their first attempt), by id."""
    return {r.id: r for r in journal.read(Path(root) / "journal").live}


def scan(root: Path | str) -> list[Entry]:
    """Read the spool without locking it (files are replaced atomically; vanishing ones
    skipped; the journal is only appended to)."""
    msg_dir = Path(root) / "msg"
    out = []
    try:
        names = sorted(p.name for p in msg_dir.iterdir() if is_queue_id(p.name))
    except FileNotFoundError:
        return []
    for name in names:
        entry = read_entry(root, name, {})
        if entry is not None:
            out.append(entry)
    listed = set(names)
    journaled = _journaled(root)
    for qid in journaled.keys() - listed:
        entry = read_entry(root, qid, journaled)
        if entry is not None:
            out.append(entry)
    out.sort(key=lambda e: (e.message.arrival, e.message.id))
    return out


def read_entry(root: Path | str, qid: str,
               journaled: Optional[dict[str, journal.Record]] = None) -> Optional[Entry]:
    """A message's envelope and state, from msg/ or else the journal (`journaled`: the
    journal already read, or None to read it when msg/ has no such file)."""
    if not is_queue_id(qid):
        return None
    try:
        msg, _digest, _off = read_envelope(Path(root) / "msg" / qid)
    except FileNotFoundError:
        rec = (_journaled(root) if journaled is None else journaled).get(qid)
        if rec is None:
            return None
        msg = parse_envelope(rec.line)[0]
        return Entry(msg, MessageState.initial(msg))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # torn: the relay quarantines it at start-up
    try:
        state = read_state_file(Path(root) / "state" / f"{qid}.json")
        return Entry(msg, state)
    except FileNotFoundError:
        return Entry(msg, MessageState.initial(msg))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Entry(msg, MessageState.initial(msg), state_error=str(exc))


def read_headers(root: Path | str, qid: str, limit: int = 64 * 1024) -> bytes:
    """The header section of a committed message (up to `limit` bytes)."""
    try:
        with open(Path(root) / "msg" / qid, "rb") as f:
            f.readline(_MAX_HEADER_LINE)
            head = f.read(limit)
    except FileNotFoundError:
        rec = _journaled(root).get(qid)
        if rec is None:
            raise
        head = rec.data[:limit]
    return header_section(head)


def header_section(data: bytes) -> bytes:
    """The bytes before the first empty line (CRLF or LF), including the last header's line end."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[: i + len(sep) // 2]
    return data


def submit_request(root: Path | str, op: str, qid: Optional[str], *,
                   timeout: float = 10.0) -> Optional[tuple[bool, str]]:
    """Drop a control request for the running relay and wait for its answer.

    Returns (ok, message), or None when no answer came within `timeout` (the request stays
    in control/ and is acted on when the relay next polls).
    """
    root = Path(root)
    name = f"{time.time_ns():x}-{secrets.token_hex(4)}"
    body = json.dumps({"op": op, "id": qid}).encode() + b"\n"
    tmp = root / "tmp" / f"{name}.req"
    _write_file(tmp, (body,))
    os.replace(tmp, root / "control" / f"{name}.req")
    res = root / "control" / f"{name}.res"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            obj = json.loads(res.read_bytes())
        except FileNotFoundError:
            time.sleep(0.05)
            continue
        except ValueError:
            time.sleep(0.05)
            continue
        _unlink_quietly(res)
        return bool(obj.get("ok")), str(obj.get("message", ""))
    return None


__all__ = [
    "ControlRequest", "CorruptMessage", "Entry", "MessageState", "QueuedMessage",
    "RecipientState", "Spool", "SpoolBusy", "SpoolError", "fsync_dir", "header_section",
    "is_queue_id", "lock_holder", "new_queue_id", "read_entry", "read_envelope",
    "read_headers", "scan", "submit_request",
]
