"""When to try a chunk again, and when to give it up: the retry policy, apart from the buffer.

A chunk's failed attempt is followed by a wait of full-jitter exponential backoff
(``retry_wait`` doubling up to ``retry_max_interval``), until ``retry_max_times`` or
``retry_timeout`` says to give up. During a stop the waits are capped short, because the stop
has a deadline that the platform enforces with SIGKILL: a 15 s backoff sleep late in a 30 s
stop is what made chunks miss both their delivery and the hand-off.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from aggregator.config.model import BufferSettings

STOP_RETRY_MAX_INTERVAL = 1.0
"""Longest wait between two attempts of one chunk once the stop has begun."""

SHUTDOWN_DEADLINE = "shutdown_deadline"
RETRIES_EXHAUSTED = "retries_exhausted"


def backoff(attempt: int, wait: float, max_interval: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max_interval, wait * 2**attempt)]."""
    return rng.uniform(0, min(max_interval, wait * 2 ** min(attempt, 62)))


@dataclass(slots=True)
class RetryState:
    """What the policy remembers of one chunk."""

    attempts: int = 0
    """Failed attempts so far."""
    first_failure: float | None = None


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


@dataclass(frozen=True, slots=True)
class RetryIn:
    delay: float


class RetryPolicy:
    def __init__(self, settings: BufferSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()

    def after_failure(
        self, state: RetryState, now: float, deadline: float | None
    ) -> GiveUp | RetryIn:
        """Record a failed attempt at ``now``; ``deadline`` is the stop's, when stopping."""
        state.attempts += 1
        if state.first_failure is None:
            state.first_failure = now
        s = self.settings
        if deadline is not None and now >= deadline:
            return GiveUp(SHUTDOWN_DEADLINE)
        if s.retry_max_times is not None and state.attempts > s.retry_max_times:
            return GiveUp(RETRIES_EXHAUSTED)
        if now - state.first_failure >= s.retry_timeout:
            return GiveUp(RETRIES_EXHAUSTED)
        delay = backoff(state.attempts - 1, s.retry_wait, s.retry_max_interval, self._rng)
        if deadline is not None:
            delay = min(delay, STOP_RETRY_MAX_INTERVAL, deadline - now)
        return RetryIn(delay)
