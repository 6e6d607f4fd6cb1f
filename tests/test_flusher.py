"""The buffer's flushing, retry, overflow and shutdown policy, against a scripted sink.

The sink here stands for the outside world (a destination that succeeds, throttles or refuses);
the buffer itself is the real one.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aggregator.buffer import Admission, Buffer, Chunk, tagged
from aggregator.config.model import BufferSettings
from aggregator.sinks.base import DELIVERED, RetryableError, WriteResult


class ScriptedSink:
    """Delivers into ``self.delivered``; ``script`` decides each attempt's fate."""

    def __init__(self, script: Callable[[int, list[bytes]], WriteResult | None] | None = None):
        self.delivered: list[bytes] = []
        self.attempts = 0
        self.script = script
        self.gate = asyncio.Event()
        self.gate.set()

    async def start(self) -> None:
        pass

    async def write(self, lines: list[bytes]) -> WriteResult:
        await self.gate.wait()
        self.attempts += 1
        result = self.script(self.attempts, lines) if self.script else None
        result = result or DELIVERED
        failed = set(result.retry) | {x for v in result.rejected.values() for x in v}
        self.delivered += [line for line in lines if line not in failed]
        return result

    async def close(self) -> None:
        pass


def settings(**kw: Any) -> BufferSettings:
    base: dict[str, Any] = {
        "flush_interval": 0.05, "retry_wait": 0.01, "retry_max_interval": 0.02,
        "chunk_limit_size": 1000, "total_limit_size": 10_000,
    }  # fmt: skip
    base.update(kw)
    return BufferSettings(**base)


def lines(n: int, start: int = 0, size: int = 10) -> list[bytes]:
    return [f"{i:0{size - 1}d}\n".encode() for i in range(start, start + n)]


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 10))


def with_secondary(
    script: Callable[[int, list[bytes]], WriteResult | None], **kw: Any
) -> tuple[Buffer, ScriptedSink, Buffer, ScriptedSink]:
    """A started buffer (``settings(**kw)``) on a scripted sink, and its started secondary:
    ``buf, sink, secondary, dead``."""
    dead = ScriptedSink()
    secondary = Buffer("dead", settings(), dead)
    sink = ScriptedSink(script)
    buf = Buffer("t", settings(**kw), sink, secondary)
    secondary.start()
    buf.start()
    return buf, sink, secondary, dead


async def settle(buf: Buffer, sink: ScriptedSink, count: int, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while len(sink.delivered) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def test_flush_on_size_count_and_interval() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        buf = Buffer("t", settings(chunk_limit_size=100, chunk_limit_records=3, flush_interval=30),
                     sink)  # fmt: skip
        buf.start()
        buf.append(lines(10), 100)  # size
        await settle(buf, sink, 10)
        assert len(sink.delivered) == 10
        for i in range(3):
            buf.append(lines(1, 10 + i), 10)  # count
        await settle(buf, sink, 13)
        assert len(sink.delivered) == 13
        fast = ScriptedSink()
        timed = Buffer("u", settings(flush_interval=0.05), fast)
        timed.start()
        timed.append(lines(1), 10)  # interval
        await settle(timed, fast, 1, timeout=1)
        assert len(fast.delivered) == 1
        await buf.close(time.monotonic() + 1)
        await timed.close(time.monotonic() + 1)
        assert buf.buffered_bytes == 0

    run(main)


def test_partial_failures_are_retried_alone_until_delivered() -> None:
    async def main() -> None:
        # Every other attempt fails a third of its lines: they alone come back.
        def script(attempt: int, batch: list[bytes]) -> WriteResult | None:
            return WriteResult(retry=batch[::3]) if attempt % 2 else None

        sink = ScriptedSink(script)
        buf = Buffer("t", settings(), sink)
        buf.start()
        sent = lines(90)
        for i in range(0, 90, 10):
            buf.append(sent[i : i + 10], 100)
        await buf.close(time.monotonic() + 5)
        assert sorted(sink.delivered) == sent  # each exactly once
        assert buf.dropped == 0 and buf.buffered_bytes == 0

    run(main)


def test_whole_call_failures_are_retried() -> None:
    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult | None:
            if attempt <= 3:
                raise RetryableError("throttled")
            return None

        sink = ScriptedSink(script)
        buf = Buffer("t", settings(), sink)
        buf.start()
        buf.append(lines(5), 50)
        await buf.close(time.monotonic() + 5)
        assert sink.delivered == lines(5) and sink.attempts == 4

    run(main)


def test_refused_and_exhausted_lines_go_to_secondary() -> None:
    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult | None:
            result = WriteResult(retry=[x for x in batch if x.startswith(b"00000001")])
            result.reject("record_too_large", [x for x in batch if x.startswith(b"00000002")])
            return result

        buf, sink, secondary, dead = with_secondary(script, retry_max_times=2)
        sent = lines(30)
        buf.append(sent, 300)
        await buf.close(time.monotonic() + 5)
        await secondary.close(time.monotonic() + 5)
        assert sorted(sink.delivered + dead.delivered) == sent
        assert sorted(dead.delivered) == sent[10:30]
        assert sink.attempts == 3  # the first try and two retries
        assert buf.dropped == 0

    run(main)


def test_without_secondary_undeliverable_lines_are_dropped_and_counted() -> None:
    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult:
            result = WriteResult()
            result.reject("invalid_argument", batch)
            return result

        buf = Buffer("t", settings(), ScriptedSink(script))
        buf.start()
        buf.append(lines(7), 70)
        await buf.close(time.monotonic() + 5)
        assert buf.dropped == 7

    run(main)


def test_block_admission_waits_for_room() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        sink.gate.clear()  # the destination stalls
        buf = Buffer("t", settings(chunk_limit_size=100, total_limit_size=200), sink)
        buf.start()
        buf.append(lines(10), 100)
        buf.append(lines(10, 10), 100)
        assert buf.admit() is Admission.BLOCKED
        waiter = asyncio.ensure_future(buf.wait_for_room())
        await asyncio.sleep(0.1)
        assert not waiter.done()
        sink.gate.set()  # the destination resumes
        await asyncio.wait_for(waiter, 2)
        assert buf.admit() is Admission.ACCEPTED
        await buf.close(time.monotonic() + 2)
        assert len(sink.delivered) == 20

    run(main)


def test_throw_exception_rejects_when_full() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        sink.gate.clear()
        s = settings(chunk_limit_size=100, total_limit_size=100, overflow_action="throw_exception")
        buf = Buffer("t", s, sink)
        buf.start()
        buf.append(lines(10), 100)
        assert buf.admit() is Admission.REJECTED
        sink.gate.set()
        await buf.close(time.monotonic() + 2)

    run(main)


def test_drop_oldest_chunk_makes_room_and_counts() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        sink.gate.clear()
        s = settings(chunk_limit_size=100, total_limit_size=200, flush_thread_count=1,
                     overflow_action="drop_oldest_chunk")  # fmt: skip
        buf = Buffer("t", s, sink)
        buf.start()
        buf.append(lines(10), 100)  # in flight, stuck
        await asyncio.sleep(0.05)
        buf.append(lines(10, 10), 100)  # queued
        assert buf.admit() is Admission.ACCEPTED  # by dropping the queued chunk
        assert buf.dropped == 10
        buf.append(lines(10, 20), 100)
        sink.gate.set()
        await buf.close(time.monotonic() + 2)
        assert sorted(sink.delivered) == lines(10) + lines(10, 20)

    run(main)


def test_shutdown_deadline_hands_everything_on() -> None:
    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult:
            raise RetryableError("service_unavailable")

        buf, _, secondary, dead = with_secondary(script, retry_wait=0.05, retry_max_interval=0.1)
        buf.append(lines(25), 250)
        started = time.monotonic()
        await buf.close(started + 0.5)
        assert time.monotonic() - started < 1.0
        await secondary.close(time.monotonic() + 1)
        assert sorted(dead.delivered) == lines(25)

    run(main)


class LongestWait(random.Random):
    """Backoff always at its cap: makes "a long wait" certain rather than likely."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_a_chunk_waiting_for_its_retry_holds_no_flush_slot() -> None:
    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult | None:
            if batch[0] == lines(1)[0]:
                raise RetryableError("throttled")  # the first chunk keeps failing
            return None

        sink = ScriptedSink(script)
        s = settings(flush_thread_count=1, retry_wait=30, retry_max_interval=30)
        buf = Buffer("t", s, sink, rng=LongestWait())
        buf.start()
        buf.append(lines(10), 100)
        buf.flush_now()
        await asyncio.sleep(0.05)  # its first attempt failed: it now waits 30 s
        buf.append(lines(10, 10), 100)
        buf.flush_now()
        await settle(buf, sink, 10, timeout=1)
        assert sink.delivered == lines(10, 10), "the only slot was held by a waiting chunk"
        assert buf.buffered_events == 10

    run(main)


def test_the_stop_cuts_a_long_retry_wait_short() -> None:
    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult | None:
            if attempt == 1:
                raise RetryableError("throttled")
            return None

        sink = ScriptedSink(script)
        buf = Buffer("t", settings(retry_wait=30, retry_max_interval=30), sink, rng=LongestWait())
        buf.start()
        buf.append(lines(5), 50)
        buf.flush_now()
        await asyncio.sleep(0.05)  # failed once; its next try is 30 s away
        started = time.monotonic()
        await buf.close(started + 5)
        assert sink.delivered == lines(5)
        assert time.monotonic() - started < 1.5  # STOP_RETRY_MAX_INTERVAL, not 30 s

    run(main)


def test_at_the_deadline_leftovers_come_back_by_tag_for_a_hand_off() -> None:
    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult:
            # Half of every attempt is refused for now: the rest is delivered.
            return WriteResult(retry=batch[::2])

        buf, sink, secondary, dead = with_secondary(script, chunk_limit_size=10_000)
        buf.leftovers = []
        sent = {"a": lines(4), "b": lines(3, 4), "c": lines(5, 7)}
        buf.append(sent["a"][:2], 20, "a")
        buf.append(sent["a"][2:], 20, "a")
        buf.append(sent["b"], 30, "b")
        buf.append(sent["c"], 50, "c")
        await buf.close(time.monotonic() + 0.3)
        left = buf.leftovers
        assert left and all(line not in sink.delivered for _, batch in left for line in batch)
        for tag, batch in left:
            assert set(batch) <= set(sent[tag])
        assert sorted(sink.delivered + [x for _, b in left for x in b]) == lines(12)
        assert buf.dropped == buf.diverted == 0 and dead.delivered == []
        assert buf.buffered_bytes == 0  # leftovers no longer count against the limit
        await secondary.close(time.monotonic() + 1)

    run(main)


def test_tagged_groups_a_subset_of_a_chunks_lines_by_tag_in_order() -> None:
    chunk_lines = lines(6)
    chunk = Chunk(chunk_lines, 60, 0.0, [("a", 2), ("b", 3), ("a", 1)])
    assert tagged(chunk, chunk_lines) == [
        ("a", chunk_lines[:2]), ("b", chunk_lines[2:5]), ("a", chunk_lines[5:]),
    ]  # fmt: skip
    subset = [chunk_lines[1], chunk_lines[4], chunk_lines[5]]
    assert tagged(chunk, subset) == [("a", subset[:1]), ("b", subset[1:2]), ("a", subset[2:])]


def test_lines_appended_while_closing_are_delivered_before_close_returns() -> None:
    """As a secondary gets lines from its primary while both stop."""

    async def main() -> None:
        sink = ScriptedSink()
        sink.gate.clear()
        buf = Buffer("t", settings(flush_interval=30), sink)
        buf.start()
        buf.append(lines(5), 50)
        closing = asyncio.create_task(buf.close(time.monotonic() + 5))
        await asyncio.sleep(0.05)  # the first chunk is in an attempt, held at the gate
        buf.append(lines(5, 5), 50)
        sink.gate.set()
        await closing
        assert sorted(sink.delivered) == lines(10)

    run(main)
