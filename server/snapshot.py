"""The routing state the relay acts on: one compiled table and the engines it names.

A Snapshot is immutable. A reload builds a new one off to the side and swaps the one
reference the scheduler reads; an attempt in flight keeps the Snapshot it started with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from routedsl import RouteTable
    from server.engines.base import Engine


@dataclass(frozen=True)
class Snapshot:
    table: "RouteTable"
    engines: "Mapping[str, Engine]"
    version: str
    loaded_at: float
