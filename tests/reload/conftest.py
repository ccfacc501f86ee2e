"""Fixtures for the reload tests: an engine context, rules texts, and ways of saving files."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.support import poll

from server.engines.base import EngineContext


@pytest.fixture
def ctx() -> EngineContext:
    return EngineContext(hostname="relay.test", nameservers=(), ca_file=None)


def rules(*engines: str, rule_lines: tuple[str, ...] = ()) -> str:
    """A rules file from engine declarations ("name = url options") and rule lines."""
    lines = [f"engine {decl}" for decl in engines]
    lines += list(rule_lines)
    return "\n".join(lines) + "\n"


def save_atomic(path: Path, text: str) -> None:
    """The supported way: write a temp file beside it, fsync, rename over it."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def until(predicate: Callable[[], object], timeout: float = 3.0, what: str = "condition"):
    """Reload tests wait at most 3 s by default: the relay promises to follow a save in 1 s."""
    return poll.until(predicate, timeout, what)
