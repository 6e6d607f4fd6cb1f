"""Open client connections of one source: counted, and closed on stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterator
from typing import Any, Generic, Protocol, TypeVar

from aggregator import metrics


class Drainable(Protocol):
    def begin_close(self, cause: str) -> None:
        """Close at the connection's first safe moment."""

    def force_close(self) -> None:
        """Close now."""


C = TypeVar("C", bound=Drainable)

POLL_INTERVAL = 0.05


class ConnectionSet(Generic[C]):
    def __init__(self, source: str) -> None:
        self._connections: set[C] = set()
        self._gauge = metrics.OPEN_CONNECTIONS.labels(source)

    def __len__(self) -> int:
        return len(self._connections)

    def __iter__(self) -> Iterator[C]:
        return iter(list(self._connections))  # a copy: closing one changes the set

    def add(self, conn: C) -> None:
        self._connections.add(conn)
        self._gauge.inc()

    def discard(self, conn: C) -> None:
        if conn in self._connections:
            self._connections.remove(conn)
            self._gauge.dec()

    async def drain(
        self, cause: str, until: float, joining: Collection[asyncio.Task[Any]] = ()
    ) -> None:
        """Close every connection at its first safe moment; those still open at ``until`` (a
        time.monotonic() time) are closed at once. ``joining``: connections being made (a TLS
        handshake, say) that begin closing once they join; those not made by ``until`` are
        cancelled."""
        await asyncio.sleep(0)  # connections the loop has just accepted join first
        for conn in list(self._connections):
            conn.begin_close(cause)
        while (
            self._connections or not all(task.done() for task in joining)
        ) and time.monotonic() < until:
            await asyncio.sleep(POLL_INTERVAL)
        for task in joining:
            task.cancel()
        for conn in list(self._connections):
            conn.force_close()
