"""Fixtures for the reload tests: an engine context, rules texts, and ways of saving files."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Callable

import pytest

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


async def until(predicate: Callable[[], bool], timeout: float = 3.0,
                what: str = "condition") -> float:
    """Poll `predicate` until true; return the seconds it took, fail after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started
