"""One bounded buffer per destination: chunks, flushing, retries and overflow.

Encoded lines are appended to an open chunk; the chunk is sealed when it reaches
``chunk_limit_size`` bytes, ``chunk_limit_records`` events or ``flush_interval`` of age, then
delivered by one of ``flush_thread_count`` concurrent delivery tasks. Every byte counts against
``total_limit_size`` from the moment it is appended until it is delivered, handed to the
secondary destination, or dropped; what happens at the limit is ``overflow_action``.

A delivery task makes attempts until its chunk is done: lines the sink asks to retry are retried
alone after an exponential backoff with full jitter; lines the sink rejects, and lines still
undelivered when the retry limits or the stop deadline run out, go to the secondary buffer when
there is one, otherwise they are dropped and counted with their reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from aggregator import metrics
from aggregator.config.model import BufferSettings
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


@dataclass(slots=True)
class Chunk:
    lines: list[bytes]
    nbytes: int
    created: float
    attempts: int = 0
    first_failure: float | None = field(default=None)


def _memory(chunk: Chunk) -> int:
    """What a chunk costs against ``total_limit_size``: its bytes and their bookkeeping."""
    return chunk.nbytes + LINE_OVERHEAD * len(chunk.lines)


def backoff(attempt: int, wait: float, max_interval: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max_interval, wait * 2**attempt)]."""
    return rng.uniform(0, min(max_interval, wait * 2 ** min(attempt, 62)))


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
        self._rng = rng or random.Random()

        self._open: Chunk | None = None
        self._ready: deque[Chunk] = deque()
        self._delivering: set[asyncio.Task[None]] = set()
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

    def append(self, lines: list[bytes], nbytes: int) -> None:
        """Add encoded lines. The caller has checked :meth:`admit` (a buffer may go over its limit
        by the one message that found it just below)."""
        chunk = self._open
        if chunk is None:
            chunk = self._open = Chunk(lines, nbytes, self._clock())
        else:
            if chunk.nbytes + nbytes > self.settings.chunk_limit_size and chunk.lines:
                self._seal()
                chunk = self._open = Chunk(lines, nbytes, self._clock())
            else:
                chunk.lines += lines
                chunk.nbytes += nbytes
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
        log.warning(
            "buffer full: dropped the oldest chunk",
            extra={"destination": self.name, "events": len(chunk.lines)},
        )
        self._drop(chunk.lines, "buffer_overflow")
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
        goes to the secondary or is dropped. Returns when this buffer is empty."""
        self._closing = True
        self._deadline = deadline
        self._seal()
        self._wakeup.set()
        if self._runner is not None:
            await self._runner
        await self.sink.close()

    async def _run(self) -> None:
        interval = self.settings.flush_interval
        while True:
            self._wakeup.clear()
            now = self._clock()
            chunk = self._open
            if chunk is not None and now - chunk.created >= interval:
                self._seal()
            while self._ready and len(self._delivering) < self.settings.flush_thread_count:
                task = asyncio.get_running_loop().create_task(self._deliver(self._ready.popleft()))
                self._delivering.add(task)
                task.add_done_callback(self._delivered)
            self._publish_state()
            if self._closing and not self._ready and not self._delivering and self._open is None:
                return
            timeout = min(interval, STATE_PUBLISH_INTERVAL)
            if self._open is not None:
                timeout = min(timeout, max(0.0, self._open.created + interval - now))
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    def _publish_state(self) -> None:
        self._m_bytes.set(self._bytes)
        self._m_chunks.set(self._chunks)
        self._m_fill.set(self.fill_ratio)

    def _delivered(self, task: asyncio.Task[None]) -> None:
        self._delivering.discard(task)
        self._chunks -= 1
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("delivery task failed", exc_info=exc, extra={"destination": self.name})
        self._wakeup.set()

    async def _deliver(self, chunk: Chunk) -> None:
        """Attempt ``chunk`` until every line is delivered, handed on, or dropped."""
        pending = chunk.lines
        try:
            while pending:
                reason, detail, pending = await self._attempt(pending)
                if not pending:
                    return
                chunk.attempts += 1
                now = self._clock()
                if chunk.first_failure is None:
                    chunk.first_failure = now
                give_up = self._give_up_reason(chunk, now)
                if give_up is not None:
                    log.error(
                        "giving up on a chunk",
                        extra={
                            "destination": self.name,
                            "reason": give_up,
                            "last_error": reason,
                            "detail": detail,
                            "events": len(pending),
                            "attempts": chunk.attempts,
                        },
                    )
                    self._hand_on(pending, give_up)
                    return
                delay = backoff(
                    chunk.attempts - 1,
                    self.settings.retry_wait,
                    self.settings.retry_max_interval,
                    self._rng,
                )
                if self._deadline is not None:
                    delay = min(delay, max(0.0, self._deadline - now))
                self._m_retries.inc()
                if retries := self._retry_warning.hit():
                    log.warning(
                        "delivery failed, will retry",
                        extra={
                            "destination": self.name,
                            "reason": reason,
                            "detail": detail,
                            "events": len(pending),
                            "retry_in": round(delay, 3),
                            "retries_since_last_line": retries,
                        },
                    )
                await asyncio.sleep(delay)
        finally:
            self._release(_memory(chunk))

    async def _attempt(self, lines: list[bytes]) -> tuple[str, str, list[bytes]]:
        """One sink write: the failure reason, its detail for the log, and the lines to retry
        (none: all done)."""
        started = self._clock()
        timeout = None if self._deadline is None else max(0.0, self._deadline - started)
        try:
            async with asyncio.timeout(timeout):
                result = await self.sink.write(lines)
        except RetryableError as exc:
            return exc.reason, str(exc), lines
        except TimeoutError:
            return "shutdown_deadline", "the stop deadline passed during the attempt", lines
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
                self._m_out_bytes.inc(sum(map(len, lines)))
            self.last_success = time.time()
            self._m_last_success.set(self.last_success)
        for reason, rejected in result.rejected.items():
            log.error(
                "destination refused events",
                extra={"destination": self.name, "reason": reason, "events": len(rejected)},
            )
            self._hand_on(rejected, reason)
        return "partial_failure", f"{len(result.retry)} events refused", result.retry

    def _give_up_reason(self, chunk: Chunk, now: float) -> str | None:
        s = self.settings
        if self._deadline is not None and now >= self._deadline:
            return "shutdown_deadline"
        if s.retry_max_times is not None and chunk.attempts > s.retry_max_times:
            return "retries_exhausted"
        if chunk.first_failure is not None and now - chunk.first_failure >= s.retry_timeout:
            return "retries_exhausted"
        return None

    def _hand_on(self, lines: list[bytes], reason: str) -> None:
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
