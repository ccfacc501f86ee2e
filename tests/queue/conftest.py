"""Fixtures shared by the spool tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from server.queue import Spool

DATA = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture
def spool(tmp_path: Path):
    s = Spool(tmp_path / "spool")
    s.open()
    yield s
    s.close()
