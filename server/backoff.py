"""When a deferred message is tried next: doubling from a minimum to a maximum, with jitter.

Owns one formula and nothing else (no clock, no queue access). After the n-th failed
attempt (n >= 1) the base delay is

    base(n) = min(max_backoff, min_backoff * 2 ** (n - 1))

so with the defaults (5 min, 1 h) the waits are 5, 10, 20, 40, 60, 60, ... minutes.
The delay actually used is drawn uniformly from [base(n) * (1 - JITTER), base(n) * (1 + JITTER)]
(JITTER = 0.2, i.e. +-20 %) with that interval cut to [min_backoff, max_backoff]: the jitter
spreads messages deferred together (after an outage) so they do not all come back at the
same instant, and no two attempts are ever closer than min_backoff nor further apart than
max_backoff. Cutting the interval (rather than clamping the drawn value) keeps the spread at
the ends: after the first failure the wait is between 1.0 and 1.2 x min_backoff, at the cap
between 0.8 and 1.0 x max_backoff.
"""
from __future__ import annotations

import random
from typing import Optional

JITTER = 0.2


def base_delay(attempts: int, min_backoff: float, max_backoff: float) -> float:
    """The delay before jitter after `attempts` failed attempts (attempts < 1 counts as 1)."""
    if min_backoff <= 0 or max_backoff < min_backoff:
        raise ValueError(f"need 0 < min_backoff <= max_backoff, got {min_backoff}, {max_backoff}")
    n = max(1, attempts)
    # cap the exponent: 2**64 * min already exceeds any sane maximum and avoids overflow
    return min(max_backoff, min_backoff * 2.0 ** min(n - 1, 64))


def next_delay(attempts: int, min_backoff: float, max_backoff: float,
               rng: Optional[random.Random] = None) -> float:
    """Seconds to wait after `attempts` failed attempts: base_delay with +-20 % jitter, clamped."""
    base = base_delay(attempts, min_backoff, max_backoff)
    low = max(min_backoff, base * (1.0 - JITTER))
    high = min(max_backoff, base * (1.0 + JITTER))
    return (rng or random).uniform(low, high)
