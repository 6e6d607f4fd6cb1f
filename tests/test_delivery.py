"""The retry policy: backoff, give-up rules, and the short waits of a stop."""

from __future__ import annotations

import random

from aggregator.config.model import BufferSettings
from aggregator.delivery import (
    RETRIES_EXHAUSTED,
    SHUTDOWN_DEADLINE,
    STOP_RETRY_MAX_INTERVAL,
    GiveUp,
    RetryIn,
    RetryPolicy,
    RetryState,
    backoff,
)


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(1)
    samples = [backoff(10, 1.0, 30.0, rng) for _ in range(1000)]
    assert 0 <= min(samples) < 3 and 27 < max(samples) <= 30
    assert all(backoff(0, 1.0, 30.0, rng) <= 1.0 for _ in range(100))


def test_gives_up_after_retry_max_times_and_retry_timeout() -> None:
    policy = RetryPolicy(BufferSettings(retry_max_times=2, retry_timeout=100), random.Random(1))
    state = RetryState()
    assert isinstance(policy.after_failure(state, 0.0, None), RetryIn)
    assert isinstance(policy.after_failure(state, 1.0, None), RetryIn)
    assert policy.after_failure(state, 2.0, None) == GiveUp(RETRIES_EXHAUSTED)
    timed = RetryPolicy(BufferSettings(retry_timeout=10), random.Random(1))
    state = RetryState()
    assert isinstance(timed.after_failure(state, 0.0, None), RetryIn)
    assert timed.after_failure(state, 10.0, None) == GiveUp(RETRIES_EXHAUSTED)


def test_during_a_stop_waits_are_short_and_end_at_the_deadline() -> None:
    policy = RetryPolicy(BufferSettings(retry_wait=30, retry_max_interval=60), random.Random(1))
    state = RetryState(attempts=5)
    delays = []
    for _ in range(200):
        decision = policy.after_failure(state, 0.0, deadline=20.0)
        assert isinstance(decision, RetryIn)
        delays.append(decision.delay)
    assert max(delays) <= STOP_RETRY_MAX_INTERVAL
    near = policy.after_failure(RetryState(), 19.9, deadline=20.0)
    assert isinstance(near, RetryIn) and near.delay <= 0.1 + 1e-9
    assert policy.after_failure(RetryState(), 20.0, deadline=20.0) == GiveUp(SHUTDOWN_DEADLINE)
