"""The file store on a real directory: the ack point, segments, replay, damage, adoption, locks
and limits."""

from __future__ import annotations

import asyncio
import random
import resource
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from aggregator import metrics
from aggregator.config.model import BufferSettings
from aggregator.stores import Chunk, tagged
from aggregator.stores.file import FileStore, segment_size
from aggregator.stores.frames import SEGMENT_HEADER, decode
from aggregator.stores.segments import StoreInUse


def settings(path: Path, **kw: Any) -> BufferSettings:
    base: dict[str, Any] = {"type": "file", "path": str(path), "chunk_limit_size": 1000,
                            "total_limit_size": 100_000, "free_space_reserve": 0,
                            "flush_interval": 30}  # fmt: skip
    return BufferSettings(**(base | kw))


def lines(n: int, start: int = 0) -> list[bytes]:
    return [b'{"i":%08d}\n' % i for i in range(start, start + n)]  # 15 bytes each


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 10))


async def opened(path: Path, worker: int = 0, workers: int = 1, **kw: Any) -> FileStore:
    store = FileStore("fs", settings(path, **kw), worker, workers)
    await store.start()
    return store


def drain(store: FileStore) -> list[Chunk]:
    chunks = []
    while (chunk := store.take()) is not None:
        chunks.append(chunk)
    return chunks


def segments(path: Path, worker: int = 0) -> list[Path]:
    return sorted((path / f"w{worker}").glob("*.seg"))


def counter(name: str) -> float:
    return sum(metrics.values(name).values())


@pytest.mark.parametrize("fsync", ["periodic", "always", "off"])
def test_appends_are_written_at_the_end_of_the_loop_turn_then_the_commit_settles(
    tmp_path: Path, fsync: str
) -> None:
    async def main() -> None:
        store = await opened(tmp_path, fsync=fsync, fsync_interval=0.01)
        first = store.append("a", lines(2), 30)
        second = store.append("b", lines(1, 2), 15)
        assert first is second and first is not None and first.ok is None
        assert not segments(tmp_path)  # nothing written yet: nothing may be acknowledged yet
        assert await first.wait() is True
        data = segments(tmp_path)[0].read_bytes()
        assert data.startswith(SEGMENT_HEADER)
        out = decode(data, len(SEGMENT_HEADER), final=True)
        assert [(f.runs, f.lines) for f in out.frames] == [([("a", 2, 30), ("b", 1, 15)],
                                                             lines(3))]  # fmt: skip
        await asyncio.sleep(0.05)  # a periodic fsync or two
        await store.close()

    run(main)


def test_a_sealed_chunk_is_read_back_with_its_tags_and_its_segment_goes_when_finished(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        store = await opened(tmp_path, chunk_limit_size=150, total_limit_size=3200)
        assert segment_size(store._settings) == 150  # one chunk a segment here
        for i in range(0, 20, 5):
            store.append("t" if i < 10 else "u", lines(5, i), 75)
            await asyncio.sleep(0)  # each its own frame, as over several loop turns
        store.seal()
        chunks = drain(store)
        assert [line for c in chunks for line in c.lines] == lines(20)
        assert [c.tags for c in chunks] == [[("t", 10, 150)], [("u", 10, 150)]]
        assert len(segments(tmp_path)) == 2 and store.held_bytes > 0
        for chunk in chunks:
            store.finish(chunk)
        assert segments(tmp_path) == [] and store.held_bytes == 0
        assert await store.close() == ""

    run(main)


@pytest.mark.parametrize("seed", range(6))
def test_chunks_kept_in_memory_and_chunks_read_back_come_in_order_with_their_tags(
    tmp_path: Path, seed: int
) -> None:
    """The open chunk and the next CHUNKS_UP sealed ones are taken from memory, the others read
    back, in any mix of appends, seals (small ones too: a disk read may then run past a chunk
    kept in memory) and takes; nothing is lost, repeated or out of order."""

    async def main() -> None:
        rng = random.Random(seed)
        store = await opened(tmp_path, chunk_limit_size=300, total_limit_size=100_000)
        sent: list[tuple[str, bytes]] = []
        taken: list[Chunk] = []
        for _ in range(120):
            step = rng.random()
            if step < 0.6:
                tag, n = rng.choice("ab"), rng.randint(1, 6)
                batch = lines(n, len(sent))
                store.append(tag, batch, 15 * n)
                sent += [(tag, line) for line in batch]
            elif step < 0.7:
                store.seal()
            elif step < 0.85:
                await asyncio.sleep(0)  # the turn's appends written: one frame
            elif (chunk := store.take()) is not None:
                taken.append(chunk)
        store.seal()
        taken += drain(store)
        got = [(tag, line) for c in taken for tag, run in tagged(c, c.lines) for line in run]
        assert got == sent
        assert all(c.nbytes == sum(map(len, c.lines)) for c in taken)
        for chunk in taken:
            store.finish(chunk)
        assert await store.close() == "" and segments(tmp_path) == []

    run(main)


def test_what_is_left_at_close_is_replayed_by_the_next_start(tmp_path: Path) -> None:
    async def main() -> None:
        store = await opened(tmp_path)
        store.append("a", lines(10), 150)
        store.seal()
        taken = store.take()
        assert taken is not None
        store.requeue(taken)  # the stop gives back what it could not deliver
        store.append("b", lines(5, 10), 75)  # and the open chunk is sealed at close
        kept = await store.close()
        assert "kept in" in kept and str(tmp_path / "w0") in kept
        replayed = counter("aggregator_buffer_replayed_events_total")

        again = await opened(tmp_path)
        chunks = drain(again)
        assert [line for c in chunks for line in c.lines] == lines(15)
        assert counter("aggregator_buffer_replayed_events_total") - replayed == 15
        for chunk in chunks:
            again.finish(chunk)
        assert await again.close() == "" and segments(tmp_path) == []

    run(main)


def test_a_second_process_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        store = await opened(tmp_path)
        with pytest.raises(StoreInUse, match="in use by another process"):
            await opened(tmp_path)
        other = await opened(tmp_path, worker=1, workers=2)  # its own subdirectory
        await other.close()
        await store.close()
        again = await opened(tmp_path)  # the lock went with the first
        await again.close()

    run(main)


def write_and_keep(tmp_path: Path, batches: int, worker: int = 0, workers: int = 1) -> None:
    async def main() -> None:
        store = await opened(tmp_path, worker, workers, chunk_limit_size=100)
        for i in range(batches):
            store.append("t", lines(5, 5 * i), 75)
            await asyncio.sleep(0)
        await store.close()

    run(main)


def replayed(tmp_path: Path) -> tuple[list[bytes], float]:
    """A store started on what ``tmp_path`` holds, everything taken and finished: the lines,
    and the events counted corrupt meanwhile."""
    corrupt = counter("aggregator_buffer_corrupt_events_total")
    out: list[bytes] = []

    async def main() -> None:
        store = await opened(tmp_path)
        for chunk in drain(store):
            out.extend(chunk.lines)
            store.finish(chunk)
        await store.close()

    run(main)
    return out, counter("aggregator_buffer_corrupt_events_total") - corrupt


def test_a_flipped_byte_loses_its_frame_only_and_the_file_is_kept_aside(tmp_path: Path) -> None:
    write_and_keep(tmp_path, 2)  # one segment, two frames
    [path] = segments(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(SEGMENT_HEADER) + 30] ^= 0xFF  # inside the first frame's lines
    path.write_bytes(bytes(data))
    assert replayed(tmp_path) == (lines(5, 5), 5)
    assert segments(tmp_path) == []
    assert [p.name for p in (tmp_path / "w0").glob("*.damaged")] == [path.name + ".damaged"]


def test_a_torn_last_write_is_left_out_without_counting_it_corrupt(tmp_path: Path) -> None:
    write_and_keep(tmp_path, 2)
    [closed] = segments(tmp_path)
    assert closed.name == f"000000000001.10.{closed.stat().st_size}.seg"  # closed with totals
    # As a process killed in the middle of its last write leaves it: still open, cut short.
    path = closed.rename(closed.with_name("000000000001.seg"))
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 7)
    assert replayed(tmp_path) == (lines(5), 0)
    assert list((tmp_path / "w0").iterdir()) == [tmp_path / "w0" / "lock"]


def test_an_older_segment_cut_short_is_damage(tmp_path: Path) -> None:
    write_and_keep(tmp_path, 2)
    write_and_keep(tmp_path, 1)  # a second run: the first run's segment is not the newest
    first = segments(tmp_path)[0]
    with first.open("r+b") as f:
        f.truncate(first.stat().st_size - 7)
    found, corrupt = replayed(tmp_path)
    assert sorted(found) == sorted(lines(5) * 2) and corrupt == 5  # its last frame


def test_a_closed_segment_cut_between_two_frames_is_damage_too(tmp_path: Path) -> None:
    """Its name says what it was closed with: nothing is lost without being counted."""
    write_and_keep(tmp_path, 2)
    [path] = segments(tmp_path)
    data = path.read_bytes()
    first_frame_end = decode(data, len(SEGMENT_HEADER), final=True).frames[0].end
    path.write_bytes(data[:first_frame_end])
    assert replayed(tmp_path) == (lines(5), 5)


def test_a_file_that_is_not_a_segment_does_not_stop_the_start(tmp_path: Path) -> None:
    write_and_keep(tmp_path, 1)
    bogus = tmp_path / "w0" / "000000000000.seg"
    bogus.write_bytes(b"not a segment\n" * 3)
    (tmp_path / "w0" / "000000000099.seg").mkdir()  # not even a file
    assert replayed(tmp_path) == (lines(5), 3)
    assert (tmp_path / "w0" / "000000000000.seg.damaged").exists()


def test_directories_of_indexes_that_no_longer_run_are_adopted(tmp_path: Path) -> None:
    for worker in range(4):
        write_and_keep(tmp_path, 1 + worker, worker, 4)  # four workers ran

    async def main() -> None:
        # Two now: worker 0 adopts w2, worker 1 adopts w3.
        zero, one = await opened(tmp_path, 0, 2), await opened(tmp_path, 1, 2)
        mine = [line for c in drain(zero) for line in c.lines]
        theirs = [line for c in drain(one) for line in c.lines]
        assert sorted(mine) == sorted(lines(5) + lines(15))
        assert sorted(theirs) == sorted(lines(10) + lines(20))
        await zero.close()
        await one.close()

    run(main)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w0", "w1"]


def test_the_disk_limit_and_the_free_space_reserve_make_it_full(tmp_path: Path) -> None:
    async def main() -> None:
        store = await opened(tmp_path, chunk_limit_size=100, total_limit_size=300)
        while store.has_room():
            store.append("t", lines(5), 75)
            await asyncio.sleep(0)
        assert store.held_bytes >= 300
        await store.close()
        roomy = await opened(tmp_path / "other", free_space_reserve=1 << 60)
        assert not roomy.has_room()  # no disk has an exabyte free
        await roomy.close()

    run(main)


def test_a_failed_write_settles_its_commit_false_and_leaves_no_trace(tmp_path: Path) -> None:
    """A write the kernel refuses (here: past the process's file size limit, as a full disk
    would) is cut back out of the segment; the next write goes on from there."""

    async def main() -> None:
        store = await opened(tmp_path)
        dropped: list[tuple[int, str]] = []
        store.on_dropped = lambda events, reason: dropped.append((events, reason))
        left: list[tuple[str, int, int]] = []
        store.on_left = left.extend  # the tenants' shares give back what was never written
        assert await store.append("t", lines(2), 30).wait()  # type: ignore[union-attr]
        size = segments(tmp_path)[0].stat().st_size
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20, limits[1]))
        try:
            commit = store.append("t", lines(5, 2), 75)
            assert commit is not None and await commit.wait() is False
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, previous)
        assert dropped == [(5, "write_error")] and not store.has_room()
        assert left == [("t", 5, 75)]
        assert segments(tmp_path)[0].stat().st_size == size
        store.refresh()  # room again
        assert store.has_room()
        assert await store.append("t", lines(1, 7), 15).wait()  # type: ignore[union-attr]
        store.seal()
        assert [line for c in drain(store) for line in c.lines] == lines(2) + lines(1, 7)
        await store.close()

    run(main)
