"""The stop's timeline: what happens by when between SIGTERM and the platform's SIGKILL.

ECS (and Kubernetes, systemd, ``docker stop``) kill a task a fixed time after SIGTERM:
``stop_timeout``. Everything a worker holds must be delivered, handed off or written to the
secondary before then, so the stop is planned backwards from that timer::

    SIGTERM ─ drain connections ─ flush with retries ─ hand-off ─ secondary ─ end ··· SIGKILL
              (≤ drain_timeout)                                           (margin)

The supervisor kills a worker that is still running when its own margin is used up, so that
its summary line is written before SIGKILL arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.config.model import Server

STOP_MARGIN = 3.0
"""Seconds kept free before the kill timer: process exit, the supervisor's summary, and the
platform's own timing slack. At most a tenth of a short stop_timeout."""
SUPERVISOR_MARGIN = 1.0
"""The supervisor kills workers still running this long before the kill timer."""
HANDOFF_SHARE = 0.25
HANDOFF_MAX = 8.0
"""Time set aside for the hand-off: this share of the time left after draining, at most
HANDOFF_MAX seconds (a hand-off to a healthy peer takes well under a second per 100 MB)."""
SECONDARY_SHARE = 0.1
SECONDARY_MAX = 5.0
"""Time set aside for the secondary to write what reaches it last, likewise."""


@dataclass(frozen=True, slots=True)
class StopPlan:
    """Monotonic-clock times, in order: drain_until ≤ flush_until ≤ handoff_until ≤ end."""

    drain_until: float
    flush_until: float
    handoff_until: float
    end: float

    @classmethod
    def make(
        cls, server: Server, now: float, *, handoff: bool, secondary: bool
    ) -> StopPlan:
        end = now + server.stop_timeout - min(STOP_MARGIN, server.stop_timeout / 10)
        # Draining gets at most a third of the stop: delivering is what the rest is for.
        drain_until = min(now + server.drain_timeout, now + (end - now) / 3)
        after_drain = end - drain_until
        secondary_time = min(SECONDARY_MAX, after_drain * SECONDARY_SHARE) if secondary else 0.0
        handoff_time = min(HANDOFF_MAX, after_drain * HANDOFF_SHARE) if handoff else 0.0
        handoff_until = end - secondary_time
        return cls(drain_until, handoff_until - handoff_time, handoff_until, end)

    @staticmethod
    def supervisor_limit(server: Server) -> float:
        """Seconds after SIGTERM at which the supervisor kills workers still running."""
        return server.stop_timeout - min(SUPERVISOR_MARGIN, server.stop_timeout / 20)
