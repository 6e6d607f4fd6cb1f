"""The memory store: chunks of lines in the worker's memory (``type = "memory"``, the default).

Every byte counts against ``total_limit_size`` from the moment it is appended until its chunk is
finished, with :data:`LINE_OVERHEAD` per line for its bookkeeping, so that the limit bounds
memory, not just text. What it holds is lost if the worker dies.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from aggregator.config.model import BufferSettings
from aggregator.stores.base import Chunk, Commit, Runs

LINE_OVERHEAD = 56
"""Bytes of memory a buffered line costs beyond its text: the bytes object's header and
allocation rounding, and its slot in the chunk's list."""


def memory_of(chunk: Chunk) -> int:
    """What a chunk costs against ``total_limit_size``: its bytes and their bookkeeping."""
    return chunk.nbytes + LINE_OVERHEAD * len(chunk.lines)


class MemoryStore:
    durable = False

    def __init__(
        self, settings: BufferSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._open: Chunk | None = None
        self._ready: deque[Chunk] = deque()
        self._requeued: deque[Chunk] = deque()  # taken, then given back: first to take again
        self._bytes = 0
        self.on_sealed: Callable[[], None] = lambda: None
        self.on_dropped: Callable[[int, str], None] = lambda events, reason: None
        self.on_left: Callable[[Runs], None] = lambda runs: None

    @property
    def held_bytes(self) -> int:
        return self._bytes

    @property
    def fill_ratio(self) -> float:
        return self._bytes / self._settings.total_limit_size

    def has_room(self) -> bool:
        return self._bytes < self._settings.total_limit_size

    def cost(self, nbytes: int, events: int) -> int:
        return nbytes + LINE_OVERHEAD * events

    async def start(self) -> None:
        pass

    def append(self, tag: str, lines: list[bytes], nbytes: int) -> Commit | None:
        """The caller has checked :meth:`has_room` (a store may go over its limit by the one
        message that found it just below)."""
        settings = self._settings
        chunk = self._open
        if chunk is not None and chunk.nbytes + nbytes > settings.chunk_limit_size:
            self.seal()
            chunk = None
        if chunk is None:
            chunk = self._open = Chunk(lines, nbytes, self._clock(),
                                       [(tag, len(lines), nbytes)])  # fmt: skip
        else:
            chunk.lines += lines
            chunk.nbytes += nbytes
            last_tag, count, run_bytes = chunk.tags[-1]
            if last_tag == tag:
                chunk.tags[-1] = (tag, count + len(lines), run_bytes + nbytes)
            else:
                chunk.tags.append((tag, len(lines), nbytes))
        self._bytes += nbytes + LINE_OVERHEAD * len(lines)
        if (
            chunk.nbytes >= settings.chunk_limit_size
            or len(chunk.lines) >= settings.chunk_limit_records
        ):
            self.seal()
        return None

    def seal(self) -> None:
        chunk = self._open
        if chunk is None:
            return
        self._open = None
        chunk.place = memory_of(chunk)  # what finish() gives back, whatever is left of it then
        self._ready.append(chunk)
        self.on_sealed()

    def seal_due(self, now: float) -> float | None:
        chunk = self._open
        if chunk is None:
            return None
        due = chunk.created + self._settings.flush_interval
        if now >= due:
            self.seal()
            return None
        return due

    def take(self) -> Chunk | None:
        if self._requeued:
            return self._requeued.popleft()
        if not self._ready:
            return None
        chunk = self._ready.popleft()
        self.on_left(chunk.tags)
        return chunk

    def requeue(self, chunk: Chunk) -> None:
        self._requeued.appendleft(chunk)

    def finish(self, chunk: Chunk) -> None:
        counted: int = chunk.place
        self._bytes -= counted

    def drop_oldest(self) -> int | None:
        if not self._ready and not self._requeued:
            self.seal()  # the open chunk is the oldest data not yet in flight
        chunk = self.take()
        if chunk is None:
            return None
        self.finish(chunk)
        return len(chunk.lines)

    @property
    def queued(self) -> bool:
        return self._open is not None or bool(self._ready) or bool(self._requeued)

    @property
    def volatile_events(self) -> int:
        chunks = [*self._ready, *self._requeued]
        if self._open is not None:
            chunks.append(self._open)
        return sum(len(c.lines) for c in chunks)

    def refresh(self) -> None:
        pass

    async def close(self) -> str:
        return ""
