"""One JSON line per event on standard output."""

from __future__ import annotations

import asyncio
import sys
from typing import BinaryIO

from aggregator.sinks.base import DELIVERED, WriteResult


class StdoutSink:
    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream or sys.stdout.buffer
        # One chunk at a time, so concurrent flushes never interleave inside a line.
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        pass

    async def write(self, lines: list[bytes]) -> WriteResult:
        data = b"".join(lines)
        async with self._lock:
            # A slow reader of our stdout (a pipe) must stall this sink, not the event loop.
            await asyncio.to_thread(self._write, data)
        return DELIVERED

    def _write(self, data: bytes) -> None:
        self._stream.write(data)
        self._stream.flush()

    async def close(self) -> None:
        pass
