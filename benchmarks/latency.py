"""End-to-end latency from the send time the load generator writes into every ``log`` value.

The sink calls a :class:`LatencySampler` with each batch of accepted record data. Reading every
event would make the sink the bottleneck, so one event line in ``every`` is read; lines are
counted with ``bytes.count`` (C), so records that carry one event each, and aggregated records
that carry thousands, cost the same few Python steps per record.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

_LOG_KEY = b'"log":"'
_DIGITS = 19


def sent_ns(line: bytes) -> int | None:
    """The send time in an event's JSON line, or None when the line has none."""
    start = line.find(_LOG_KEY)
    if start < 0:
        return None
    digits = line[start + len(_LOG_KEY) : start + len(_LOG_KEY) + _DIGITS]
    return int(digits) if len(digits) == _DIGITS and digits.isdigit() else None


def percentile(ordered: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile of sorted values (a value that was measured, never a blend)."""
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


class LatencySampler:
    """An ``on_accept`` hook for :class:`emulator.FirehoseEmulator`."""

    def __init__(self, every: int = 50, clock: Callable[[], int] = time.time_ns) -> None:
        if every < 1:
            raise ValueError("every must be at least 1")
        self.every = every
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        self.samples: list[int] = []
        """Latencies in nanoseconds, in arrival order."""
        self.unparsed = 0
        """Sampled lines that carried no send time (not from the load generator)."""
        self._skip = 0  # lines to pass over before the next sample

    def __call__(self, stream: str, datas: list[bytes]) -> None:
        now = self._clock()
        every = self.every
        for data in datas:
            lines = data.count(b"\n")
            if self._skip >= lines:
                self._skip -= lines
                continue
            picked = [data] if lines == 1 else data.split(b"\n")[self._skip : lines : every]
            for line in picked:
                sent = sent_ns(line)
                if sent is None:
                    self.unparsed += 1
                else:
                    self.samples.append(now - sent)
            self._skip = every - 1 - (lines - 1 - self._skip) % every

    def summary(self) -> dict[str, Any]:
        """Sample count and percentiles in milliseconds (None without samples)."""
        ordered = sorted(self.samples)
        result: dict[str, Any] = {"samples": len(ordered), "unparsed": self.unparsed}
        for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
            result[f"{name}_ms"] = percentile(ordered, fraction) / 1e6 if ordered else None
        return result
