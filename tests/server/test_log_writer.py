"""The relay's log lines, written from a thread: every line arrives, in order and formatted
as the operator's handler formats it, with the values it had when it was logged; a line
that cannot be formatted is reported and the next ones still come; stopping writes what
is left."""
from __future__ import annotations

import io
import logging

import pytest

from server.app import log_from_thread


@pytest.fixture
def stream():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    yield out
    root.handlers[:] = saved
    root.setLevel(level)


def test_lines_arrive_in_order_with_the_values_they_had(stream) -> None:
    stop = log_from_thread()
    log = logging.getLogger("routedsl.test")
    recipients = ["a@x.test"]
    for i in range(500):
        log.info("message %d to %s", i, recipients)
    recipients.append("changed@x.test")          # after the call: not in the line
    stop()
    lines = stream.getvalue().splitlines()
    assert lines == [f"INFO routedsl.test message {i} to ['a@x.test']" for i in range(500)]


def test_a_bad_line_is_reported_and_the_next_ones_still_come(stream, capsys) -> None:
    stop = log_from_thread()
    log = logging.getLogger("routedsl.test")
    log.warning("%d recipients", "not a number")
    log.warning("still here")
    stop()
    assert stream.getvalue() == "WARNING routedsl.test still here\n"
    assert "--- Logging error ---" in capsys.readouterr().err   # as logging reports it


def test_lines_below_a_handlers_level_are_left_out(stream) -> None:
    logging.getLogger().handlers[0].setLevel(logging.WARNING)
    stop = log_from_thread()
    log = logging.getLogger("routedsl.test")
    log.info("quiet")
    log.error("loud")
    stop()
    assert stream.getvalue() == "ERROR routedsl.test loud\n"
