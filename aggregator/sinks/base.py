"""What every sink is to the buffer: write a chunk of encoded lines, say what became of them.

A chunk reaches a sink as a list of lines, one event per line, each already encoded as JSON and
ending in a newline. The buffer owns retries, backoff and the secondary destination; a sink only
makes one attempt and classifies the outcome, so that the policy lives in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class RetryableError(Exception):
    """The whole attempt failed for a reason that may pass (throttling, network, 5xx)."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


@dataclass(slots=True)
class WriteResult:
    """The outcome of one attempt. Lines not named here were delivered."""

    retry: list[bytes] = field(default_factory=list)
    """Lines that failed for a passing reason (e.g. per-record throttling): send them again."""

    rejected: dict[str, list[bytes]] = field(default_factory=dict)
    """Lines this destination will never take, by reason (e.g. ``record_too_large``)."""

    def reject(self, reason: str, lines: list[bytes]) -> None:
        if lines:
            self.rejected.setdefault(reason, []).extend(lines)


DELIVERED = WriteResult()
"""Every line was delivered. Shared and never mutated: sinks return it on success."""


class Sink(Protocol):
    """A destination's output side. One instance per destination per worker."""

    async def start(self) -> None:
        """Open clients or files; called once before the first write."""

    async def write(self, lines: list[bytes]) -> WriteResult:
        """Deliver ``lines`` once. Raise :class:`RetryableError` when the whole attempt failed for
        a passing reason; put lines in ``WriteResult.rejected`` when they can never be delivered.
        Must not retry by itself."""

    async def close(self) -> None:
        """Release clients and files; called once after the last write."""
