"""The flusher's flushing, retry, overflow and shutdown policy, against a scripted sink, over
both stores (memory, and file in a temporary directory).

The sink here stands for the outside world (a destination that succeeds, throttles or refuses);
the flusher and the stores are the real ones.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aggregator.config.model import BufferSettings
from aggregator.flusher import Flusher
from aggregator.sinks.base import DELIVERED, RetryableError, WriteResult
from aggregator.stores import Chunk, ChunkStore, build_store, tagged


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


def settings(store: str = "memory", **kw: Any) -> BufferSettings:
    """Small, fast settings; ``store``: "memory" or a file store's directory."""
    base: dict[str, Any] = {
        "flush_interval": 0.05, "retry_wait": 0.01, "retry_max_interval": 0.02,
        "chunk_limit_size": 1000, "total_limit_size": 10_000,
    }  # fmt: skip
    if store != "memory":
        base |= {"type": "file", "path": store, "free_space_reserve": 0}
    base.update(kw)
    return BufferSettings(**base)


async def started(
    name: str, s: BufferSettings, sink: ScriptedSink, secondary: Flusher | None = None,
    rng: random.Random | None = None,
) -> Flusher:  # fmt: skip
    """A started flusher (its store too) on ``sink``."""
    store: ChunkStore = build_store(name, s)
    flusher = Flusher(name, s, store, sink, secondary, rng=rng)
    await store.start()
    flusher.start()
    return flusher


def append(flusher: Flusher, lines: list[bytes], nbytes: int, tag: str = "") -> None:
    flusher.store.append(tag, lines, nbytes)


async def stop(flusher: Flusher, deadline: float) -> str:
    """The stop as the pipeline runs it, without a hand-off."""
    await flusher.close(deadline)
    return await flusher.release()


def lines(n: int, start: int = 0, size: int = 10) -> list[bytes]:
    return [f"{i:0{size - 1}d}\n".encode() for i in range(start, start + n)]


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 10))


async def with_secondary(
    script: Callable[[int, list[bytes]], WriteResult | None], store: str = "memory", **kw: Any
) -> tuple[Flusher, ScriptedSink, Flusher, ScriptedSink]:
    """A started flusher (``settings(store, **kw)``) on a scripted sink, and its started
    secondary (in memory): ``buf, sink, secondary, dead``."""
    dead = ScriptedSink()
    secondary = await started("dead", settings(), dead)
    sink = ScriptedSink(script)
    buf = await started("t", settings(store, **kw), sink, secondary)
    return buf, sink, secondary, dead


async def settle(buf: Flusher, sink: ScriptedSink, count: int, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while len(sink.delivered) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def test_flush_on_size_count_and_interval(store: str) -> None:
    async def main() -> None:
        sink = ScriptedSink()
        s = settings(store, chunk_limit_size=100, chunk_limit_records=3, flush_interval=30)
        buf = await started("t", s, sink)
        append(buf, lines(10), 100)  # size
        await settle(buf, sink, 10)
        assert len(sink.delivered) == 10
        for i in range(3):
            append(buf, lines(1, 10 + i), 10)  # count
        await settle(buf, sink, 13)
        assert len(sink.delivered) == 13
        fast = ScriptedSink()
        other = store if store == "memory" else store + "-2"
        timed = await started("u", settings(other, flush_interval=0.05), fast)
        append(timed, lines(1), 10)  # interval
        await settle(timed, fast, 1, timeout=1)
        assert len(fast.delivered) == 1
        assert await stop(buf, time.monotonic() + 1) == ""
        assert await stop(timed, time.monotonic() + 1) == ""
        assert buf.store.held_bytes == 0

    run(main)


def test_partial_failures_are_retried_alone_until_delivered(store: str) -> None:
    async def main() -> None:
        # Every other attempt fails a third of its lines: they alone come back.
        def script(attempt: int, batch: list[bytes]) -> WriteResult | None:
            return WriteResult(retry=batch[::3]) if attempt % 2 else None

        sink = ScriptedSink(script)
        buf = await started("t", settings(store), sink)
        sent = lines(90)
        for i in range(0, 90, 10):
            append(buf, sent[i : i + 10], 100)
        await stop(buf, time.monotonic() + 5)
        assert sorted(sink.delivered) == sent  # each exactly once
        assert buf.dropped == 0 and buf.store.held_bytes == 0

    run(main)


def test_whole_call_failures_are_retried(store: str) -> None:
    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult | None:
            if attempt <= 3:
                raise RetryableError("throttled")
            return None

        sink = ScriptedSink(script)
        buf = await started("t", settings(store), sink)
        append(buf, lines(5), 50)
        await stop(buf, time.monotonic() + 5)
        assert sink.delivered == lines(5) and sink.attempts == 4

    run(main)


def test_refused_and_exhausted_lines_go_to_secondary(store: str) -> None:
    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult | None:
            result = WriteResult(retry=[x for x in batch if x.startswith(b"00000001")])
            result.reject("record_too_large", [x for x in batch if x.startswith(b"00000002")])
            return result

        buf, sink, secondary, dead = await with_secondary(script, store, retry_max_times=2)
        sent = lines(30)
        append(buf, sent, 300)
        await stop(buf, time.monotonic() + 5)
        await stop(secondary, time.monotonic() + 5)
        assert sorted(sink.delivered + dead.delivered) == sent
        assert sorted(dead.delivered) == sent[10:30]
        assert sink.attempts == 3  # the first try and two retries
        assert buf.dropped == 0

    run(main)


def test_without_secondary_undeliverable_lines_are_dropped_and_counted(store: str) -> None:
    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult:
            result = WriteResult()
            result.reject("invalid_argument", batch)
            return result

        buf = await started("t", settings(store), ScriptedSink(script))
        append(buf, lines(7), 70)
        assert await stop(buf, time.monotonic() + 5) == ""
        assert buf.dropped == 7

    run(main)


def test_shutdown_deadline_hands_everything_on() -> None:
    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult:
            raise RetryableError("service_unavailable")

        buf, _, secondary, dead = await with_secondary(
            script, retry_wait=0.05, retry_max_interval=0.1
        )
        append(buf, lines(25), 250)
        started_at = time.monotonic()
        await stop(buf, started_at + 0.5)
        assert time.monotonic() - started_at < 1.0
        await stop(secondary, time.monotonic() + 1)
        assert sorted(dead.delivered) == lines(25)

    run(main)


def test_at_the_deadline_a_file_buffer_keeps_what_is_left_on_disk(tmp_path: Path) -> None:
    """Not to the secondary, not dropped: the next start on the same path delivers it."""

    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult:
            raise RetryableError("service_unavailable")

        path = str(tmp_path / "buffer")
        buf, _, secondary, dead = await with_secondary(script, path, chunk_limit_size=100)
        for i in range(0, 30, 10):
            append(buf, lines(10, i), 100)
        kept = await stop(buf, time.monotonic() + 0.3)
        assert "kept in" in kept and buf.dropped == buf.diverted == 0
        await stop(secondary, time.monotonic() + 1)
        assert dead.delivered == []

        sink = ScriptedSink()
        again = await started("t", settings(path, chunk_limit_size=100), sink)
        await settle(again, sink, 30)
        assert sorted(sink.delivered) == lines(30)
        assert await stop(again, time.monotonic() + 1) == ""
        assert not list((tmp_path / "buffer" / "w0").glob("*.seg"))

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
        buf = await started("t", s, sink, rng=LongestWait())
        append(buf, lines(10), 100)
        buf.flush_now()
        await asyncio.sleep(0.05)  # its first attempt failed: it now waits 30 s
        append(buf, lines(10, 10), 100)
        buf.flush_now()
        await settle(buf, sink, 10, timeout=1)
        assert sink.delivered == lines(10, 10), "the only slot was held by a waiting chunk"
        assert buf.volatile_events == 10

    run(main)


def test_an_outage_holds_a_window_of_chunks_not_every_chunk(store: str) -> None:
    """Chunks beyond WINDOW_PER_THREAD x flush_thread_count wait in the store, untried: an
    outage costs a few attempts per retry interval, and a file buffer reads back only those."""

    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult | None:
            raise RetryableError("throttled")

        sink = ScriptedSink(script)
        s = settings(store, flush_thread_count=2, chunk_limit_size=100, retry_wait=30,
                     retry_max_interval=30)  # fmt: skip
        buf = await started("t", s, sink, rng=LongestWait())
        for i in range(0, 200, 10):
            append(buf, lines(10, i), 100)  # 20 chunks
        await asyncio.sleep(0.2)
        assert sink.attempts == 4  # the window: 2 x 2, each tried once and waiting 30 s
        assert buf.store.queued  # the other 16 wait in the store

    run(main)


def test_chunks_waiting_to_resend_a_few_records_do_not_hold_back_the_new_ones(
    store: str,
) -> None:
    """A chunk counts in the window for what is left of it: with Firehose refusing a record in
    ten, every chunk gets its first attempt at once, not just the first two."""

    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult | None:
            return WriteResult(retry=batch[:1]) if len(batch) == 10 else None

        sink = ScriptedSink(script)
        s = settings(store, flush_thread_count=1, chunk_limit_size=100, retry_wait=30,
                     retry_max_interval=30)  # fmt: skip
        buf = await started("t", s, sink, rng=LongestWait())
        for i in range(0, 100, 10):
            append(buf, lines(10, i), 100)  # 10 chunks; the window is 2 chunks' worth
        await settle(buf, sink, 90, timeout=2)
        assert sink.attempts == 10 and len(sink.delivered) == 90

    run(main)


def test_the_stop_cuts_a_long_retry_wait_short(store: str) -> None:
    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult | None:
            if attempt == 1:
                raise RetryableError("throttled")
            return None

        sink = ScriptedSink(script)
        s = settings(store, retry_wait=30, retry_max_interval=30)
        buf = await started("t", s, sink, rng=LongestWait())
        append(buf, lines(5), 50)
        buf.flush_now()
        await asyncio.sleep(0.05)  # failed once; its next try is 30 s away
        started_at = time.monotonic()
        await stop(buf, started_at + 5)
        assert sink.delivered == lines(5)
        assert time.monotonic() - started_at < 1.5  # STOP_RETRY_MAX_INTERVAL, not 30 s

    run(main)


def test_at_the_deadline_what_is_held_goes_back_to_the_store_by_tag(store: str) -> None:
    """For a hand-off: the pipeline takes it from there."""

    async def main() -> None:
        def script(attempt: int, batch: list[bytes]) -> WriteResult:
            # Half of every attempt is refused for now: the rest is delivered.
            return WriteResult(retry=batch[::2])

        buf, sink, secondary, dead = await with_secondary(script, store, chunk_limit_size=10_000)
        sent = {"a": lines(4), "b": lines(3, 4), "c": lines(5, 7)}
        append(buf, sent["a"][:2], 20, "a")
        append(buf, sent["a"][2:], 20, "a")
        append(buf, sent["b"], 30, "b")
        append(buf, sent["c"], 50, "c")
        await buf.close(time.monotonic() + 0.3)
        left = []
        while (chunk := buf.store.take()) is not None:
            left += tagged(chunk, chunk.lines)
            buf.store.finish(chunk)
        assert left and all(line not in sink.delivered for _, batch in left for line in batch)
        for tag, batch in left:
            assert set(batch) <= set(sent[tag])
        assert sorted(sink.delivered + [x for _, b in left for x in b]) == lines(12)
        assert buf.dropped == buf.diverted == 0 and dead.delivered == []
        assert await buf.release() == ""
        assert buf.store.held_bytes == 0
        await stop(secondary, time.monotonic() + 1)

    run(main)


def test_tagged_groups_a_subset_of_a_chunks_lines_by_tag_in_order() -> None:
    chunk_lines = lines(6)
    chunk = Chunk(chunk_lines, 60, 0.0, [("a", 2, 20), ("b", 3, 30), ("a", 1, 10)])
    assert tagged(chunk, chunk_lines) == [
        ("a", chunk_lines[:2]), ("b", chunk_lines[2:5]), ("a", chunk_lines[5:]),
    ]  # fmt: skip
    subset = [chunk_lines[1], chunk_lines[4], chunk_lines[5]]
    assert tagged(chunk, subset) == [("a", subset[:1]), ("b", subset[1:2]), ("a", subset[2:])]


def test_lines_appended_while_closing_are_delivered_before_close_returns(store: str) -> None:
    """As a secondary gets lines from its primary while both stop."""

    async def main() -> None:
        sink = ScriptedSink()
        sink.gate.clear()
        buf = await started("t", settings(store, flush_interval=30), sink)
        append(buf, lines(5), 50)
        closing = asyncio.create_task(buf.close(time.monotonic() + 5))
        await asyncio.sleep(0.05)  # the first chunk is in an attempt, held at the gate
        append(buf, lines(5, 5), 50)
        sink.gate.set()
        await closing
        assert sorted(sink.delivered) == lines(10)
        assert await buf.release() == ""

    run(main)
