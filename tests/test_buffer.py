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

from aggregator.buffer import Admission, Buffer
from aggregator.delivery import backoff
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


async def settle(buf: Buffer, sink: ScriptedSink, count: int, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while len(sink.delivered) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(1)
    samples = [backoff(10, 1.0, 30.0, rng) for _ in range(1000)]
    assert 0 <= min(samples) < 3 and 27 < max(samples) <= 30
    assert all(backoff(0, 1.0, 30.0, rng) <= 1.0 for _ in range(100))


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

        dead = ScriptedSink()
        secondary = Buffer("dead", settings(), dead)
        sink = ScriptedSink(script)
        buf = Buffer("t", settings(retry_max_times=2), sink, secondary)
        secondary.start()
        buf.start()
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

        dead = ScriptedSink()
        secondary = Buffer("dead", settings(), dead)
        buf = Buffer("t", settings(retry_wait=0.05, retry_max_interval=0.1), ScriptedSink(script),
                     secondary)  # fmt: skip
        secondary.start()
        buf.start()
        buf.append(lines(25), 250)
        started = time.monotonic()
        await buf.close(started + 0.5)
        assert time.monotonic() - started < 1.0
        await secondary.close(time.monotonic() + 1)
        assert sorted(dead.delivered) == lines(25)

    run(main)
