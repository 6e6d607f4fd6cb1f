"""One bounded buffer per destination: chunks, flushing, retries and overflow.

Encoded lines are appended to an open chunk; the chunk is sealed when it reaches
``chunk_limit_size`` bytes, ``chunk_limit_records`` events or ``flush_interval`` of age, then
delivered by one of ``flush_thread_count`` concurrent delivery tasks. Every byte counts against
``total_limit_size`` from the moment it is appended until it is delivered, handed to the
secondary destination, or dropped; what happens at the limit is ``overflow_action``.

A delivery task makes one attempt. Lines the sink asks to retry wait for their turn
(:mod:`aggregator.delivery` says how long) without holding a delivery slot, then are retried
alone; lines the sink rejects, and lines still undelivered when the retry limits run out, go to
the secondary buffer when there is one, otherwise they are dropped and counted with their
reason. At the stop deadline, what is left is given back for a hand-off when the pipeline asks
for it (:attr:`Buffer.leftovers`), else handed to the secondary in the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from aggregator import metrics
from aggregator.config.model import BufferSettings
from aggregator.delivery import (
    SHUTDOWN_DEADLINE,
    STOP_RETRY_MAX_INTERVAL,
    GiveUp,
    RetryPolicy,
    RetryState,
)
from aggregator.logs import Throttle
from aggregator.sinks.base import RetryableError, Sink

log = logging.getLogger(__name__)

LINE_OVERHEAD = 56
"""Bytes of memory a buffered line costs beyond its text: the bytes object's header and
allocation rounding, and its slot in the chunk's list. Counted against ``total_limit_size`` so
that the limit bounds memory, not just text."""

RETRY_WARNING_INTERVAL = 5.0
"""Seconds between two "will retry" log lines of one destination (every retry is counted in
aggregator_retries_total)."""

STATE_PUBLISH_INTERVAL = 1.0
"""Seconds between two updates of the buffer gauges (health reads them) when nothing happens;
updating them per append would cost more than the append."""


class Admission(enum.Enum):
    ACCEPTED = "accepted"
    BLOCKED = "blocked"  # overflow_action = block and no room: wait for room, then offer again
    REJECTED = "rejected"  # overflow_action = throw_exception and no room


Tagged = tuple[str, list[bytes]]
"""Lines of one tag, in order: what a buffer gives back at the stop deadline for a hand-off."""


@dataclass(slots=True)
class Chunk:
    lines: list[bytes]
    nbytes: int
    created: float
    tags: list[tuple[str, int]]
    """``(tag, count)`` runs over ``lines``: a line's tag, kept for a hand-off at stop."""
    pending: list[bytes] | None = None
    """Lines still to deliver after an attempt that delivered some (None: all of them)."""
    retry: RetryState = field(default_factory=RetryState)

    @property
    def undelivered(self) -> list[bytes]:
        return self.lines if self.pending is None else self.pending


def _memory(chunk: Chunk) -> int:
    """What a chunk costs against ``total_limit_size``: its bytes and their bookkeeping."""
    return chunk.nbytes + LINE_OVERHEAD * len(chunk.lines)


def tagged(chunk: Chunk, lines: list[bytes]) -> list[Tagged]:
    """``lines`` (all of ``chunk``'s or a subset, in order) grouped in runs of one tag."""
    tag_of: dict[int, str] = {}
    i = 0
    for tag, count in chunk.tags:
        for line in chunk.lines[i : i + count]:
            tag_of[id(line)] = tag
        i += count
    out: list[Tagged] = []
    for line in lines:
        tag = tag_of[id(line)]
        if out and out[-1][0] == tag:
            out[-1][1].append(line)
        else:
            out.append((tag, [line]))
    return out


class Buffer:
    def __init__(
        self,
        name: str,
        settings: BufferSettings,
        sink: Sink,
        secondary: Buffer | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.sink = sink
        self.secondary = secondary
        self._clock = clock
        self._policy = RetryPolicy(settings, rng)

        self._open: Chunk | None = None
        self._ready: deque[Chunk] = deque()
        # Chunks waiting for their next attempt, by time: they hold memory, not a slot.
        self._waiting: list[tuple[float, int, Chunk]] = []
        self._order = itertools.count()  # tie-breaker: heapq never compares two chunks
        self._delivering: dict[asyncio.Task[None], Chunk] = {}
        self._bytes = 0
        self._chunks = 0  # sealed chunks not yet finished
        self._room = asyncio.Event()
        self._room.set()
        self._wakeup = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self._deadline: float | None = None

        self.dropped = 0
        """Events dropped by this buffer since start (for the exit summary)."""
        self.diverted = 0
        """Events handed to the secondary since start (for the exit summary)."""
        self.handed_off = 0
        """Events handed off to another task at stop (counted by the pipeline)."""
        self.leftovers: list[Tagged] | None = None
        """Set to a list before :meth:`close` to have what the stop deadline leaves undelivered
        given back here, by tag, instead of handed to the secondary (for a hand-off)."""
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

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    @property
    def fill_ratio(self) -> float:
        return self._bytes / self.settings.total_limit_size

    @property
    def buffered_events(self) -> int:
        """Events held and not yet delivered (for a forced stop's count)."""
        chunks = [*self._ready, *(c for _, _, c in self._waiting), *self._delivering.values()]
        if self._open is not None:
            chunks.append(self._open)
        return sum(len(c.undelivered) for c in chunks)

    def has_room(self) -> bool:
        return self._bytes < self.settings.total_limit_size

    # --- the input side ---------------------------------------------------------------------

    def admit(self) -> Admission:
        """Whether a new message may be appended now, applying ``overflow_action`` if not."""
        if self.has_room():
            return Admission.ACCEPTED
        self._publish_state()  # health reads the fill ratio: let it see "full" at once
        action = self.settings.overflow_action
        if action == "block":
            return Admission.BLOCKED
        if action == "drop_oldest_chunk" and self._drop_oldest():
            return Admission.ACCEPTED
        return Admission.REJECTED

    async def wait_for_room(self) -> None:
        while not self.has_room():
            self._room.clear()
            await self._room.wait()

    def append(self, lines: list[bytes], nbytes: int, tag: str = "") -> None:
        """Add encoded lines of one tag. The caller has checked :meth:`admit` (a buffer may go
        over its limit by the one message that found it just below)."""
        chunk = self._open
        if chunk is not None and chunk.nbytes + nbytes > self.settings.chunk_limit_size:
            self._seal()
            chunk = None
        if chunk is None:
            chunk = self._open = Chunk(lines, nbytes, self._clock(), [(tag, len(lines))])
        else:
            chunk.lines += lines
            chunk.nbytes += nbytes
            last_tag, count = chunk.tags[-1]
            if last_tag == tag:
                chunk.tags[-1] = (tag, count + len(lines))
            else:
                chunk.tags.append((tag, len(lines)))
        self._bytes += nbytes + LINE_OVERHEAD * len(lines)
        if (
            chunk.nbytes >= self.settings.chunk_limit_size
            or len(chunk.lines) >= self.settings.chunk_limit_records
        ):
            self._seal()

    def _seal(self) -> None:
        chunk = self._open
        if chunk is None:
            return
        self._open = None
        self._ready.append(chunk)
        self._chunks += 1
        self._wakeup.set()

    def _drop_oldest(self) -> bool:
        if not self._ready:
            self._seal()  # the open chunk is the oldest data not yet in flight
        if not self._ready:
            return False
        chunk = self._ready.popleft()
        self._chunks -= 1
        lines = chunk.undelivered
        log.warning(
            "buffer full: dropped the oldest chunk",
            extra={"destination": self.name, "events": len(lines)},
        )
        self._drop(lines, "buffer_overflow")
        self._release(_memory(chunk))
        return True

    # --- the output side --------------------------------------------------------------------

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(
            self._run(), name=f"buffer:{self.name}"
        )

    def flush_now(self) -> None:
        """Seal the open chunk so it is delivered without waiting for its interval."""
        self._seal()

    async def close(self, deadline: float) -> None:
        """Deliver everything, retrying until ``deadline`` (a ``clock()`` time); what is left then
        goes to :attr:`leftovers`, the secondary, or is dropped. Returns when this buffer is
        empty."""
        self._closing = True
        self._deadline = deadline
        self._seal()
        # Waits planned before the stop (up to retry_max_interval) would outlast it.
        soon = self._clock() + STOP_RETRY_MAX_INTERVAL
        self._waiting = [(min(at, soon), n, chunk) for at, n, chunk in self._waiting]
        heapq.heapify(self._waiting)
        self._wakeup.set()
        if self._runner is not None:
            await self._runner
        await self.sink.close()

    async def _run(self) -> None:
        interval = self.settings.flush_interval
        loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()
            now = self._clock()
            chunk = self._open
            if chunk is not None and (self._closing or now - chunk.created >= interval):
                self._seal()  # while closing, lines appended since (a secondary's) go at once
            if self._deadline is not None and now >= self._deadline:
                self._give_up_queued()
            while self._waiting and self._waiting[0][0] <= now:
                self._ready.appendleft(heapq.heappop(self._waiting)[2])  # oldest data first
            while self._ready and len(self._delivering) < self.settings.flush_thread_count:
                chunk = self._ready.popleft()
                task = loop.create_task(self._deliver(chunk))
                self._delivering[task] = chunk
                task.add_done_callback(self._delivered)
            self._publish_state()
            held = self._open or self._ready or self._waiting or self._delivering
            if self._closing and not held:
                return
            timeout = min(interval, STATE_PUBLISH_INTERVAL)
            if self._open is not None:
                timeout = min(timeout, self._open.created + interval - now)
            if self._waiting:
                timeout = min(timeout, self._waiting[0][0] - now)
            if self._deadline is not None:
                timeout = min(timeout, self._deadline - now)
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
                async with asyncio.timeout(max(0.0, timeout)):
                    await self._wakeup.wait()

    def _give_up_queued(self) -> None:
        """The stop deadline has come: every chunk not in an attempt is handed on now."""
        queued = [*self._ready, *(chunk for _, _, chunk in sorted(self._waiting))]
        self._ready.clear()
        self._waiting.clear()
        for chunk in queued:
            self._give_up(
                chunk, chunk.undelivered, SHUTDOWN_DEADLINE, "not delivered before the deadline"
            )
            self._finish(chunk)

    def _publish_state(self) -> None:
        self._m_bytes.set(self._bytes)
        self._m_chunks.set(self._chunks)
        self._m_fill.set(self.fill_ratio)

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
        chunk.pending = pending
        now = self._clock()
        decision = self._policy.after_failure(chunk.retry, now, self._deadline)
        if isinstance(decision, GiveUp):
            self._give_up(chunk, pending, decision.reason, f"{reason}: {detail}")
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
        heapq.heappush(self._waiting, (now + decision.delay, next(self._order), chunk))

    def _finish(self, chunk: Chunk) -> None:
        self._chunks -= 1
        self._release(_memory(chunk))

    def _give_up(self, chunk: Chunk, lines: list[bytes], reason: str, last_error: str) -> None:
        log.error(
            "giving up on a chunk",
            extra={
                "destination": self.name,
                "reason": reason,
                "last_error": last_error,
                "events": len(lines),
                "attempts": chunk.retry.attempts,
            },
        )
        if reason == SHUTDOWN_DEADLINE and self.leftovers is not None:
            self.leftovers += tagged(chunk, lines)
            return
        self.hand_on(lines, reason)

    async def _attempt(self, chunk: Chunk) -> tuple[str, str, list[bytes]]:
        """One sink write of what is left of ``chunk``: the failure reason, its detail for the
        log, and the lines to retry (none: all done)."""
        lines = chunk.undelivered
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
                nbytes = chunk.nbytes if chunk.pending is None else sum(map(len, lines))
                self._m_out_bytes.inc(nbytes)
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
        if self.secondary is not None and not self.secondary._stopped:
            metrics.SECONDARY_EVENTS.labels(self.name, reason).inc(len(lines))
            self.diverted += len(lines)
            # The bytes move from this buffer's budget to the secondary's: not over the sum.
            self.secondary.append(lines, sum(map(len, lines)))
            return
        self._drop(lines, reason)

    def _drop(self, lines: list[bytes], reason: str) -> None:
        self.dropped += len(lines)
        metrics.DROPPED_EVENTS.labels(self.name, reason).inc(len(lines))
        log.error(
            "events dropped",
            extra={"destination": self.name, "reason": reason, "events": len(lines)},
        )

    @property
    def _stopped(self) -> bool:
        return self._closing and self._runner is not None and self._runner.done()

    def _release(self, nbytes: int) -> None:
        self._bytes -= nbytes
        if self.has_room():
            self._room.set()
