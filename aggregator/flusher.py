"""One destination's delivery: chunks from its store, to its sink, until each is done.

The store (:mod:`aggregator.stores`) seals chunks; the flusher takes them oldest first and makes
attempts, ``flush_thread_count`` at a time. A delivery task makes one attempt. Lines the sink
asks to retry wait for their turn (:mod:`aggregator.delivery` says how long) without holding a
delivery slot, then are retried alone; lines the sink rejects, and lines still undelivered when
the retry limits run out, go to the secondary destination when there is one, otherwise they are
dropped and counted with their reason.

The flusher holds at most ``WINDOW_PER_THREAD x flush_thread_count`` chunks' worth of lines at
once (in an attempt or waiting for a retry); the rest wait in the store, in order. So during an
outage a buffer tries its oldest chunks again and again, not every chunk it holds, and a file
buffer reads back only what it is about to send.

At the stop deadline, what is held goes back to the store; the pipeline may then hand it off,
and :meth:`Flusher.release` gives what is still left to the secondary (or drops it, counted),
unless the store keeps it on disk for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable

from aggregator import metrics
from aggregator.config.model import BufferSettings
from aggregator.delivery import (
    SHUTDOWN_DEADLINE,
    STOP_RETRY_MAX_INTERVAL,
    GiveUp,
    RetryPolicy,
)
from aggregator.logs import Throttle
from aggregator.sinks.base import RetryableError, Sink
from aggregator.stores import Chunk, ChunkStore

log = logging.getLogger(__name__)

WINDOW_PER_THREAD = 2
"""Chunks' worth of lines held at once (in an attempt or waiting for a retry) per flush
thread: a chunk counts for what is left to deliver of it, so that chunks waiting to resend a
few refused records (a partial failure) do not hold back the new ones as whole chunks would."""

RETRY_WARNING_INTERVAL = 5.0
"""Seconds between two "will retry" log lines of one destination (every retry is counted in
aggregator_retries_total)."""

STATE_PUBLISH_INTERVAL = 1.0
"""Seconds between two updates of the buffer gauges (health reads them) and two checks of the
store (a file store's free space) when nothing happens."""


class Flusher:
    def __init__(
        self,
        name: str,
        settings: BufferSettings,
        store: ChunkStore,
        sink: Sink,
        secondary: Flusher | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.store = store
        self.sink = sink
        self.secondary = secondary
        self._clock = clock
        self._policy = RetryPolicy(settings, rng)
        self._window = WINDOW_PER_THREAD * settings.flush_thread_count * settings.chunk_limit_size
        self._held_bytes = 0  # left to deliver of the chunks held

        # Chunks waiting for their next attempt, by time: they hold memory, not a slot.
        self._waiting: list[tuple[float, int, Chunk]] = []
        self._order = itertools.count()  # tie-breaker: heapq never compares two chunks
        self._due: deque[Chunk] = deque()  # their time has come: before any new chunk
        self._delivering: dict[asyncio.Task[None], Chunk] = {}
        self._room = asyncio.Event()
        self._room.set()
        self._wakeup = asyncio.Event()
        store.on_sealed = self._wakeup.set
        store.on_dropped = self.count_dropped
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self._deadline: float | None = None

        self.dropped = 0
        """Events dropped by this destination since start (for the exit summary)."""
        self.diverted = 0
        """Events handed to the secondary since start (for the exit summary)."""
        self.handed_off = 0
        """Events handed off to another task at stop (counted by the pipeline)."""
        self.last_success: float | None = None
        """Wall-clock time of the last successful delivery."""

        self._retry_warning = Throttle(RETRY_WARNING_INTERVAL, clock)
        self._m_out_events = metrics.OUTPUT_EVENTS.labels(name)
        self._m_out_bytes = metrics.OUTPUT_BYTES.labels(name)
        self._m_bytes = metrics.BUFFER_BYTES.labels(name)
        self._m_chunks = metrics.BUFFER_CHUNKS.labels(name)
        self._m_fill = metrics.BUFFER_FILL_RATIO.labels(name)
        self._m_last_success = metrics.LAST_SUCCESS.labels(name)
        self._m_flush = metrics.FLUSH_SECONDS.labels(name)
        self._m_retries = metrics.RETRIES.labels(name)

    # --- state ------------------------------------------------------------------------------

    def _held_chunks(self) -> list[Chunk]:
        return [*self._due, *(c for _, _, c in self._waiting), *self._delivering.values()]

    @property
    def volatile_events(self) -> int:
        """Events held that the worker's death would lose (for a forced stop's count)."""
        held = 0 if self.store.durable else sum(len(c.lines) for c in self._held_chunks())
        return held + self.store.volatile_events

    # --- room ---------------------------------------------------------------------------------

    async def wait_for_room(self) -> None:
        while not self.store.has_room():
            self._room.clear()
            await self._room.wait()

    def _check_room(self) -> None:
        if self.store.has_room():
            self._room.set()

    # --- the output side --------------------------------------------------------------------

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(
            self._run(), name=f"flusher:{self.name}"
        )

    def flush_now(self) -> None:
        """Seal the open chunk so it is delivered without waiting for its interval."""
        self.store.seal()

    async def close(self, deadline: float) -> None:
        """Deliver everything, retrying until ``deadline`` (a ``clock()`` time); what is still
        held then goes back to the store (see :meth:`release`)."""
        self._closing = True
        self._deadline = deadline
        # Waits planned before the stop (up to retry_max_interval) would outlast it.
        soon = self._clock() + STOP_RETRY_MAX_INTERVAL
        self._waiting = [(min(at, soon), n, chunk) for at, n, chunk in self._waiting]
        heapq.heapify(self._waiting)
        self._wakeup.set()
        if self._runner is not None:
            await self._runner
        await self.sink.close()

    async def release(self) -> str:
        """After :meth:`close` (and a hand-off): what the store still holds goes to the
        secondary, or is dropped and counted, unless the store keeps it on disk for the next
        start. Closes the store; returns what it kept, for the stop's summary."""
        if not self.store.durable:
            left = 0
            while (chunk := self.store.take()) is not None:
                left += len(chunk.lines)
                self.hand_on(chunk.lines, SHUTDOWN_DEADLINE)
                self.store.finish(chunk)
            if left:
                log.error("events not delivered before the stop deadline",
                          extra={"destination": self.name, "events": left})  # fmt: skip
        kept = await self.store.close()
        self.publish_state()
        return kept

    async def _run(self) -> None:
        store = self.store
        next_upkeep = self._clock() + STATE_PUBLISH_INTERVAL
        while True:
            self._wakeup.clear()
            now = self._clock()
            if self._closing:
                store.seal()  # while closing, lines appended since (a secondary's) go at once
                seal_due = None
            else:
                seal_due = store.seal_due(now)
            if now >= next_upkeep:
                store.refresh()
                self._check_room()
                next_upkeep = now + STATE_PUBLISH_INTERVAL
            expired = self._deadline is not None and now >= self._deadline
            if expired:
                self._give_back_held()
            else:
                self._start_deliveries(now)
            self.publish_state()
            held = self._waiting or self._due or store.queued
            if self._closing and not self._delivering and (expired or not held):
                return
            wakes = [now + self.settings.flush_interval, now + STATE_PUBLISH_INTERVAL]
            if seal_due is not None:
                wakes.append(seal_due)
            if self._waiting:
                wakes.append(self._waiting[0][0])
            if self._deadline is not None and not expired:
                wakes.append(self._deadline)
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
                async with asyncio.timeout(max(0.0, min(wakes) - now)):
                    await self._wakeup.wait()

    def _start_deliveries(self, now: float) -> None:
        """Fill the free delivery slots: chunks whose retry is due first, then new ones from
        the store while fewer than the window are held."""
        while self._waiting and self._waiting[0][0] <= now:
            self._due.append(heapq.heappop(self._waiting)[2])
        loop = asyncio.get_running_loop()
        while len(self._delivering) < self.settings.flush_thread_count:
            if self._due:
                chunk: Chunk | None = self._due.popleft()
            elif self._held_bytes < self._window:
                chunk = self.store.take()
                if chunk is not None:
                    self._hold(chunk, chunk.nbytes)
            else:
                return
            if chunk is None:
                return
            task = loop.create_task(self._deliver(chunk))
            self._delivering[task] = chunk
            task.add_done_callback(self._delivered)

    def _give_back_held(self) -> None:
        """The stop deadline has come: every chunk not in an attempt goes back to the store,
        the oldest to be taken first."""
        held = [*self._due, *(chunk for _, _, chunk in self._waiting)]
        self._due.clear()
        self._waiting.clear()
        for chunk in sorted(held, key=lambda c: c.created, reverse=True):
            self._hold(chunk, 0)
            self.store.requeue(chunk)

    def publish_state(self) -> None:
        store = self.store
        self._m_bytes.set(store.held_bytes)
        self._m_chunks.set(len(self._delivering) + len(self._waiting) + len(self._due))
        self._m_fill.set(store.fill_ratio)

    def _delivered(self, task: asyncio.Task[None]) -> None:
        self._delivering.pop(task, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("delivery task failed", exc_info=exc, extra={"destination": self.name})
        self._wakeup.set()

    async def _deliver(self, chunk: Chunk) -> None:
        """One attempt at ``chunk``: then it is done, handed on, or waits for its next turn."""
        reason, detail, pending = await self._attempt(chunk)
        if not pending:
            self._finish(chunk)
            return
        chunk.keep(pending)
        now = self._clock()
        decision = self._policy.after_failure(chunk.retry, now, self._deadline)
        if isinstance(decision, GiveUp):
            if decision.reason == SHUTDOWN_DEADLINE:
                self._hold(chunk, 0)
                self.store.requeue(chunk)  # for the hand-off, or the next start
                return
            log.error(
                "giving up on a chunk",
                extra={"destination": self.name, "reason": decision.reason,
                       "last_error": f"{reason}: {detail}", "events": len(pending),
                       "attempts": chunk.retry.attempts},
            )  # fmt: skip
            self.hand_on(pending, decision.reason)
            self._finish(chunk)
            return
        self._m_retries.inc()
        if retries := self._retry_warning.hit():
            log.warning(
                "delivery failed, will retry",
                extra={
                    "destination": self.name,
                    "reason": reason,
                    "detail": detail,
                    "events": len(pending),
                    "retry_in": round(decision.delay, 3),
                    "retries_since_last_line": retries,
                },
            )
        self._hold(chunk, chunk.nbytes)
        heapq.heappush(self._waiting, (now + decision.delay, next(self._order), chunk))

    def _hold(self, chunk: Chunk, nbytes: int) -> None:
        """Count ``chunk`` for ``nbytes`` in the window from now on (0: it is let go)."""
        self._held_bytes += nbytes - chunk.held
        chunk.held = nbytes

    def _finish(self, chunk: Chunk) -> None:
        self._hold(chunk, 0)
        self.store.finish(chunk)
        self._check_room()

    async def _attempt(self, chunk: Chunk) -> tuple[str, str, list[bytes]]:
        """One sink write of what is left of ``chunk``: the failure reason, its detail for the
        log, and the lines to retry (none: all done)."""
        lines = chunk.lines
        started = self._clock()
        timeout = None if self._deadline is None else max(0.0, self._deadline - started)
        try:
            async with asyncio.timeout(timeout):
                result = await self.sink.write(lines)
        except RetryableError as exc:
            return exc.reason, str(exc), lines
        except TimeoutError:
            return SHUTDOWN_DEADLINE, "the stop deadline passed during the attempt", lines
        except Exception as exc:  # a sink bug must not lose the chunk: treat as retryable
            log.exception("sink raised unexpectedly", extra={"destination": self.name})
            return "sink_error", repr(exc), lines
        finally:
            self._m_flush.observe(self._clock() - started)
        failed = len(result.retry) + sum(len(v) for v in result.rejected.values())
        delivered = len(lines) - failed
        if delivered:
            self._m_out_events.inc(delivered)
            if not failed:
                # A whole chunk's size is known: no pass over lines long out of the CPU's cache.
                self._m_out_bytes.inc(chunk.nbytes)
            self.last_success = time.time()
            self._m_last_success.set(self.last_success)
        for reason, rejected in result.rejected.items():
            log.error(
                "destination refused events",
                extra={"destination": self.name, "reason": reason, "events": len(rejected)},
            )
            self.hand_on(rejected, reason)
        return "partial_failure", f"{len(result.retry)} events refused", result.retry

    def hand_on(self, lines: list[bytes], reason: str) -> None:
        """Lines this destination cannot deliver: to the secondary, else dropped."""
        secondary = self.secondary
        if secondary is not None and not secondary._stopped:
            metrics.SECONDARY_EVENTS.labels(self.name, reason).inc(len(lines))
            self.diverted += len(lines)
            # The bytes move from this buffer's budget to the secondary's: not over the sum.
            secondary.store.append("", lines, sum(map(len, lines)))
            return
        self.count_dropped(len(lines), reason)

    def count_dropped(self, events: int, reason: str) -> None:
        self.dropped += events
        metrics.DROPPED_EVENTS.labels(self.name, reason).inc(events)
        log.error(
            "events dropped", extra={"destination": self.name, "reason": reason, "events": events}
        )

    @property
    def _stopped(self) -> bool:
        return self._closing and self._runner is not None and self._runner.done()
