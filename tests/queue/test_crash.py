"""Crash points: a subprocess committing messages is SIGKILLed between write and rename (and
around it); after recovery every acknowledged message is intact and nothing torn is live."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from server.queue import Spool
from tests.queue.crash_child import body

REPO = Path(__file__).resolve().parents[2]


def run_child(root: Path, point: str, k: int, count: int, mode: str) -> list[tuple[str, int]]:
    proc = subprocess.run([sys.executable, "-m", "tests.queue.crash_child", str(root), point,
                           str(k), str(count), mode],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    acks = []
    for line in proc.stdout.splitlines():
        assert line != "DONE"
        word, qid, index = line.split()
        acks.append((word, qid, int(index)) if mode == "state" else (qid, int(index)))
    return acks


# a message is renamed into msg/ before the file's fsync (which then commits the rename too)
@pytest.mark.parametrize("mode,point", [
    (mode, point) for mode in ("put", "accept")
    for point in ("mid_write", "before_rename", "before_filesync", "before_dirsync", "after_ack")
] + [("journal", point) for point in ("mid_write", "before_filesync", "after_ack")])
def test_nothing_acknowledged_is_lost_nothing_torn_is_live(tmp_path: Path, point: str, mode: str) -> None:
    # concurrent accepts share fsyncs (group commit): fewer of them than messages
    k = 2 if (mode, point) in (("accept", "before_dirsync"), ("journal", "before_filesync")) else 7
    acks = run_child(tmp_path, point, k, 30, mode)
    if mode == "put":
        assert len(acks) == (k if point == "after_ack" else k - 1)
    spool = Spool(tmp_path)
    live = {m.id: m for m in spool.open()}
    try:
        assert list(spool.tmp_dir.iterdir()) == []          # temp files dropped
        torn = [p.name.split(".")[0] for p in spool.corrupt_dir.iterdir()]
        if (mode, point) == ("journal", "mid_write"):       # the segment cut short is kept
            assert torn == ["0000000000000001"]
        else:
            assert torn == []                               # rename is atomic: nothing torn in msg/
        assert list(spool.journal_dir.iterdir()) == []      # the journal emptied into msg/
        for qid, i in acks:                                   # every acknowledged message, intact
            assert qid in live, f"acknowledged message {i} lost at {point}"
            assert spool.read_data(qid) == body(i)
            assert live[qid].recipients == (f"r{i}@crash.test",)
        extra = set(live) - {qid for qid, _ in acks}
        for qid in extra:                                     # committed but never acknowledged:
            data = spool.read_data(qid)                       # allowed (at-least-once), but whole
            i = int(live[qid].recipients[0][1:].split("@")[0])
            assert data == body(i)
        if mode == "put":
            # one at a time, the dying commit is live only once it was renamed into msg/
            assert len(extra) == (1 if point in ("before_filesync", "before_dirsync") else 0)
            assert len(live) == len(acks) + len(extra)
    finally:
        spool.close()


@pytest.mark.parametrize("point", ["mid_write", "before_rename", "before_dirsync"])
def test_a_state_update_cut_short_leaves_the_old_or_the_new_state(tmp_path: Path, point: str) -> None:
    k = 4
    lines = run_child(tmp_path, point, k, 10, "state")
    (_, qid, _), *states = lines
    last = states[-1][2] if states else 0
    assert last == k - 1
    spool = Spool(tmp_path)
    live = {m.id for m in spool.open()}
    try:
        assert live == {qid}
        assert list(spool.tmp_dir.iterdir()) == [] and list(spool.corrupt_dir.iterdir()) == []
        # the last acknowledged state, or the one being written when the process died
        assert spool.state(qid).attempts in (last, last + 1)
        if point != "before_dirsync":
            assert spool.state(qid).attempts == last
    finally:
        spool.close()
