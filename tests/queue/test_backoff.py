"""Backoff: doubling from the minimum to the maximum, jitter within +-20 %, clamped."""
from __future__ import annotations

import random

import pytest

from server.backoff import base_delay, next_delay


def test_doubling_then_capped() -> None:
    assert [base_delay(n, 300, 3600) for n in range(1, 8)] == [300, 600, 1200, 2400, 3600, 3600, 3600]
    assert base_delay(0, 300, 3600) == 300
    assert base_delay(10_000, 300, 3600) == 3600  # no overflow on huge attempt counts


def test_jitter_stays_within_bounds_and_varies() -> None:
    rng = random.Random(7)
    for n in range(1, 12):
        base = base_delay(n, 300, 3600)
        seen = [next_delay(n, 300, 3600, rng) for _ in range(200)]
        assert all(300 <= d <= 3600 for d in seen)
        assert all(base * 0.8 - 1e-9 <= d <= base * 1.2 + 1e-9 for d in seen)
        assert len(set(seen)) > 190  # spread out even at the bounds, never piled on one value


def test_jitter_spreads_a_herd() -> None:
    rng = random.Random(1)
    seen = sorted(next_delay(3, 300, 3600, rng) for _ in range(1000))
    assert seen[0] < 1200 * 0.85 and seen[-1] > 1200 * 1.15


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        next_delay(1, 0, 10)
    with pytest.raises(ValueError):
        next_delay(1, 10, 5)
