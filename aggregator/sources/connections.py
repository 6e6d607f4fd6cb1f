"""Open client connections of one source: counted, and drained on shutdown."""

from __future__ import annotations

import asyncio
import time
from typing import Generic, Protocol, TypeVar

from aggregator import metrics


class Drainable(Protocol):
    last_activity: float

    @property
    def idle(self) -> bool: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Drainable)

POLL_INTERVAL = 0.05


class ConnectionSet(Generic[C]):
    def __init__(self, source: str) -> None:
        self._connections: set[C] = set()
        self._gauge = metrics.OPEN_CONNECTIONS.labels(source)

    def __len__(self) -> int:
        return len(self._connections)

    def add(self, conn: C) -> None:
        self._connections.add(conn)
        self._gauge.inc()

    def discard(self, conn: C) -> None:
        if conn in self._connections:
            self._connections.remove(conn)
            self._gauge.dec()

    async def drain(self, quiet: float, timeout: float) -> None:
        """Close each connection once it has been quiet for ``quiet`` seconds with nothing
        pending; after ``timeout`` close the rest. Data a client sent before the stop is read."""
        deadline = time.monotonic() + timeout
        while self._connections and time.monotonic() < deadline:
            now = time.monotonic()
            for conn in list(self._connections):
                if conn.idle and now - conn.last_activity >= quiet:
                    conn.close()
            await asyncio.sleep(POLL_INTERVAL)
        for conn in list(self._connections):
            conn.close()
