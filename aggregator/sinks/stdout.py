"""One JSON line per event on standard output.

Every worker shares the same stdout. A pipe takes a write of up to PIPE_BUF bytes whole, so
lines are written in groups of at most that size: lines of different workers never interleave
(a single line longer than PIPE_BUF can, on a pipe; files and terminals are not affected).
"""

from __future__ import annotations

import asyncio
import os
import select
import sys
from collections.abc import Iterator

from aggregator.sinks.base import DELIVERED, RetryableError, WriteResult


def atomic_pieces(lines: list[bytes], limit: int = select.PIPE_BUF) -> Iterator[bytes]:
    """Consecutive lines joined into pieces of at most ``limit`` bytes (a longer line alone)."""
    piece: list[bytes] = []
    size = 0
    for line in lines:
        if piece and size + len(line) > limit:
            yield b"".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        yield b"".join(piece)


class StdoutSink:
    def __init__(self, fd: int | None = None) -> None:
        self._fd = sys.stdout.fileno() if fd is None else fd
        self._lock = asyncio.Lock()  # one chunk at a time within this worker

    async def start(self) -> None:
        pass

    async def write(self, lines: list[bytes]) -> WriteResult:
        async with self._lock:
            try:
                # A slow reader of our stdout (a pipe) must stall this sink, not the event loop.
                await asyncio.to_thread(self._write, lines)
            except OSError as exc:
                raise RetryableError("stdout_error", str(exc)) from exc
        return DELIVERED

    def _write(self, lines: list[bytes]) -> None:
        for piece in atomic_pieces(lines):
            view = memoryview(piece)
            while view:
                view = view[os.write(self._fd, view) :]

    async def close(self) -> None:
        pass
