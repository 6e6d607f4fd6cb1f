"""Discards events; the buffer counts them as delivered."""

from __future__ import annotations

from aggregator.sinks.base import DELIVERED, WriteResult


class NullSink:
    async def start(self) -> None:
        pass

    async def write(self, lines: list[bytes]) -> WriteResult:
        return DELIVERED

    async def close(self) -> None:
        pass
