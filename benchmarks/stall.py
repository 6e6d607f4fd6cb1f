"""The backpressure check: while the sink answers nothing, memory must stay bounded by
``total_limit_size`` and the senders must be slowed down to (nearly) nothing.

The runner feeds a :class:`StallWatch` samples taken every half second of the stall; the rate
over its last seconds shows the settled state, once buffers and socket queues are full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WORKING_SLACK = 48 * 1024 * 1024
"""What a busy worker holds beyond its idle size and its buffers: the allocator's slack, the
batches being decoded, formatted and sent. The bound is total_limit_size + the worker's RSS
before the load (the interpreter and libraries, about 60 MiB) + this; the run prints each."""
SETTLED_WINDOW = 2.0
"""Seconds at the end of the stall over which the settled send rate is measured."""


@dataclass
class StallWatch:
    at: float
    """Seconds into the load when the sink was stalled."""
    duration: float
    total_limit_bytes: int
    idle_rss_bytes: int
    """The largest worker's RSS before the load."""
    samples: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since the stall began, events sent so far)."""
    max_rss: dict[int, int] = field(default_factory=dict)
    """The largest RSS seen of each worker (by pid) during the stall."""

    def sample(self, since_stall: float, sent_events: int, rss: dict[int, int]) -> None:
        self.samples.append((since_stall, sent_events))
        for pid, size in rss.items():
            self.max_rss[pid] = max(size, self.max_rss.get(pid, 0))

    def report(self) -> dict[str, Any]:
        largest = max(self.max_rss.values(), default=None)
        bound = self.total_limit_bytes + self.idle_rss_bytes + WORKING_SLACK
        return {
            "at_s": self.at,
            "for_s": self.duration,
            "total_limit_bytes": self.total_limit_bytes,
            "idle_rss_bytes": self.idle_rss_bytes,
            "rss_bound_bytes": bound,
            "max_worker_rss_bytes": largest,
            "rss_within_bound": None if largest is None else largest <= bound,
            "sent_events": self._sent_since(0.0),
            "send_rate_events_per_s": self._rate_since(0.0),
            "settled_send_rate_events_per_s": self._rate_since(
                max(0.0, self.duration - SETTLED_WINDOW)
            ),
        }

    def _sent_since(self, start: float) -> int | None:
        points = [(t, n) for t, n in self.samples if t >= start]
        return points[-1][1] - points[0][1] if len(points) >= 2 else None

    def _rate_since(self, start: float) -> float | None:
        points = [(t, n) for t, n in self.samples if t >= start]
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return None
        return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])
