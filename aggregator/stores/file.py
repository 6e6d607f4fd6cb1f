"""The file store: every event written to disk before it is acknowledged (``type = "file"``).

Layout: ``<path>/w<worker index>/``, locked by the worker that uses it (a second process gets a
clear error, never a share), holding append-only segment files (:mod:`.frames`): ``<seq>.seg``
while written, renamed ``<seq>.<events>.<bytes>.seg`` when closed, so that a file cut short
later (by a failing disk, by hand) says what it lost.

Writing: what the sources append in one turn of the event loop is one frame, written with one
``writev`` at the end of that turn (or when the chunk it belongs to is sealed); the
:class:`~aggregator.stores.base.Commit` it returns settles then, and only then may the events be
acknowledged. A write that fails (a full disk) writes nothing: its events are not acknowledged,
are counted, and the store counts as full until the next check of the free space.

Reading: a sealed chunk is a span of frames on disk; the flusher takes chunks one at a time and
each is read back then (usually from the page cache). The open chunk's lines and those of the
next CHUNKS_UP sealed ones also stay in memory (Fluent Bit's "chunks up"), so that the usual
chunk, taken soon after its seal, is not read and parsed back. So memory depends on how many
chunks the flusher holds at once, never on the backlog.

Reclaiming: a segment is deleted once everything in it is finished (delivered, handed on or
dropped); a segment holds at most about ``segment_size`` bytes, so disk comes back in steps.

Restart: segments found at start are read again through the same path, oldest first (at least
once: a chunk delivered just before a crash may be delivered twice). A worker also adopts the
directories of worker indexes that no longer run. Damage never stops the start: a frame that
fails its checksum is skipped and counted, and its file is kept aside as ``*.damaged``; a frame
cut short at the very end of the newest segment is a write a crash interrupted, never
acknowledged, and is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator import metrics
from aggregator.config.model import BufferSettings
from aggregator.logs import Throttle
from aggregator.stores.base import Chunk, Commit, Runs, extend_runs
from aggregator.stores.frames import SEGMENT_HEADER, Frame, decode, frame_parts
from aggregator.stores.segments import (
    Segment,
    adopt,
    keep_aside,
    lock_directory,
    scan,
    segment_path,
    sync_directory,
    write_all,
)

log = logging.getLogger(__name__)

SEGMENT_SHARE = 32
MAX_SEGMENT_SIZE = 64 * 1024 * 1024
"""A segment is closed at about total_limit_size / SEGMENT_SHARE (at least one chunk, at most
MAX_SEGMENT_SIZE), so that a full buffer is many segments and disk comes back in small steps."""
READ_SLACK = 64 * 1024
"""Read this much beyond a chunk's size: the frame that ends it is usually in the same read."""
WRITE_ERROR_LOG_INTERVAL = 10.0
CHUNKS_UP = 2
"""Sealed chunks whose lines stay in memory until taken, beside the open one's."""


def segment_size(settings: BufferSettings) -> int:
    share = settings.total_limit_size // SEGMENT_SHARE
    return max(settings.chunk_limit_size, min(share, MAX_SEGMENT_SIZE))


@dataclass(slots=True, eq=False)
class Span:
    """Sealed frames not taken yet: ``[start, end)`` of a segment."""

    segment: Segment
    start: int
    end: int


@dataclass(slots=True, eq=False)
class _Up:
    """A sealed chunk's frames, ``[start, end)`` of ``segment``, with their lines in memory."""

    segment: Segment
    start: int
    end: int
    lines: list[bytes]
    runs: Runs


class FileStore:
    durable = True

    def __init__(
        self,
        name: str,
        settings: BufferSettings,
        worker: int = 0,
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.path is not None
        self.name = name
        self._settings = settings
        self._root = Path(settings.path)
        self._dir = self._root / f"w{worker}"
        self._worker = worker
        self._workers = workers
        self._clock = clock
        self._segment_size = segment_size(settings)
        self._lock: int | None = None
        self._segments: dict[int, Segment] = {}
        self._next_seq = 1
        self._head: Segment | None = None
        self._fd: int | None = None  # the head's, for writing
        self._spans: deque[Span] = deque()
        self._requeued: deque[Chunk] = deque()
        # The open chunk: frames written to the head since the last seal.
        self._open_start: int | None = None
        self._open_events = 0
        self._open_bytes = 0
        self._open_created: float | None = None
        self._open_lines: list[bytes] = []
        self._open_runs: Runs = []
        self._up: deque[_Up] = deque()
        # This turn's appends, written together.
        self._runs: list[list[Any]] = []
        self._lines: list[bytes] = []
        self._pending_bytes = 0
        self._commit: Commit | None = None
        self._disk_bytes = 0
        self._low_space = False
        self._unsynced: list[int] = []  # closed segments' descriptors awaiting their fsync
        self._dirty = False
        self._syncer: asyncio.Task[None] | None = None
        self._write_warning = Throttle(WRITE_ERROR_LOG_INTERVAL)
        self.on_sealed: Callable[[], None] = lambda: None
        self.on_dropped: Callable[[int, str], None] = lambda events, reason: None
        self.on_left: Callable[[Runs], None] = lambda runs: None
        self._m_disk = metrics.BUFFER_DISK_BYTES.labels(name)
        self._m_segments = metrics.BUFFER_SEGMENTS.labels(name)

    # --- state ------------------------------------------------------------------------------

    @property
    def held_bytes(self) -> int:
        return self._disk_bytes + self._pending_bytes

    @property
    def fill_ratio(self) -> float:
        return self.held_bytes / self._settings.total_limit_size

    def has_room(self) -> bool:
        return not self._low_space and self.held_bytes < self._settings.total_limit_size

    def cost(self, nbytes: int, events: int) -> int:
        return nbytes  # and a frame's header per loop turn, not per event

    @property
    def queued(self) -> bool:
        return bool(
            self._lines or self._open_start is not None or self._spans or self._requeued
        )

    @property
    def volatile_events(self) -> int:
        return len(self._lines)

    # --- start: lock, adopt, replay ---------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._open_directory)
        self.refresh()
        if self._settings.fsync == "periodic":
            self._syncer = asyncio.get_running_loop().create_task(
                self._sync_periodically(), name=f"fsync:{self.name}"
            )

    def _open_directory(self) -> None:
        """Lock this worker's directory; take in the segments an earlier process left, its own
        and those of indexes that no longer run, to be read first."""
        self._lock = lock_directory(self._dir)
        found = scan(self._dir)
        self._next_seq = max((s.seq for s in found), default=0) + 1
        found += adopt(self._root, self._dir, self._worker, self._workers, self._next_seq)
        for segment in found:
            self._next_seq = max(self._next_seq, segment.seq + 1)
            if not self._valid_header(segment):
                continue
            self._segments[segment.seq] = segment
            self._disk_bytes += segment.size
            if segment.size > len(SEGMENT_HEADER):
                segment.live += 1
                self._spans.append(Span(segment, len(SEGMENT_HEADER), segment.size))
            else:
                self._retire(segment)
        if self._segments:
            log.warning(
                "file buffer: replaying what an earlier process left",
                extra={"destination": self.name, "directory": str(self._dir),
                       "segments": len(self._segments), "bytes": self._disk_bytes},
            )  # fmt: skip
        self._publish()

    def _valid_header(self, segment: Segment) -> bool:
        """A segment too short for its header, or with another one, is damage as a whole; one
        that cannot be read at all is left where it is, and said."""
        try:
            with open(segment.path, "rb") as f:
                head = f.read(len(SEGMENT_HEADER))
        except OSError as exc:
            log.error("file buffer: cannot read a segment; left as it is",
                      extra={"destination": self.name, "file": str(segment.path),
                             "error": str(exc)})  # fmt: skip
            return False
        if head == SEGMENT_HEADER or (segment.torn_ok and SEGMENT_HEADER.startswith(head)):
            if head != SEGMENT_HEADER:  # created, and the process died before its header
                segment.path.unlink()
                return False
            return True
        events = segment.path.read_bytes().count(b"\n")
        self._count_damage(segment, segment.size, events)
        self._keep_aside(segment)
        return False

    # --- writing ----------------------------------------------------------------------------

    def append(self, tag: str, lines: list[bytes], nbytes: int) -> Commit | None:
        """The caller has checked :meth:`has_room`. The lines are written at the end of this
        turn of the event loop (or sooner, when their chunk is sealed)."""
        settings = self._settings
        if (
            self._open_bytes + self._pending_bytes + nbytes > settings.chunk_limit_size
            and (self._lines or self._open_start is not None)
        ):
            self.seal()
        if not self._lines:
            self._commit = Commit()
            asyncio.get_running_loop().call_soon(self._write)
            if self._open_created is None:
                self._open_created = self._clock()
        runs = self._runs
        if runs and runs[-1][0] == tag:
            runs[-1][1] += len(lines)
            runs[-1][2] += nbytes
        else:
            runs.append([tag, len(lines), nbytes])
        self._lines += lines
        self._pending_bytes += nbytes
        commit = self._commit
        if (
            self._open_bytes + self._pending_bytes >= settings.chunk_limit_size
            or self._open_events + len(self._lines) >= settings.chunk_limit_records
        ):
            self.seal()
        return commit

    def _write(self) -> None:
        """Write this turn's appends as one frame; settle their commit."""
        lines, commit = self._lines, self._commit
        if not lines or commit is None:
            return
        runs, nbytes = self._runs, self._pending_bytes
        self._runs, self._lines, self._pending_bytes, self._commit = [], [], 0, None
        try:
            head, fd = self._writable_head()
            start = head.size
            written = write_all(fd, frame_parts(runs, b"".join(lines)))
            if self._settings.fsync == "always":
                os.fdatasync(fd)
        except OSError as exc:
            self._write_failed(exc, len(lines))
            if self._open_start is None:
                self._open_created = None
            self.on_left([(tag, count, size) for tag, count, size in runs])
            commit.settle(False)
            return
        head.size += written
        head.events += len(lines)
        self._disk_bytes += written
        self._dirty = True
        if self._open_start is None:
            self._open_start = start
        self._open_events += len(lines)
        self._open_bytes += nbytes
        self._open_lines += lines
        extend_runs(self._open_runs, runs)
        commit.settle(True)

    def _writable_head(self) -> tuple[Segment, int]:
        if self._head is not None and self._fd is not None:
            return self._head, self._fd
        seq = self._next_seq
        path = segment_path(self._dir, seq)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        try:
            write_all(fd, [SEGMENT_HEADER])
            if self._settings.fsync != "off":
                sync_directory(self._dir)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._next_seq += 1
        head = self._head = Segment(seq, path, len(SEGMENT_HEADER), live=1)
        self._fd = fd
        self._segments[seq] = head
        self._disk_bytes += head.size
        self._publish()
        return head, fd

    def _write_failed(self, exc: OSError, events: int) -> None:
        """Nothing of the frame may stay in the file: cut it back. If even that fails, this
        segment is closed where its last good frame ends; what follows is counted as damage
        when it is read back (an I/O error, not a full disk)."""
        head, fd = self._head, self._fd
        if head is not None and fd is not None:
            try:
                os.ftruncate(fd, head.size)
            except OSError:
                self._close_open_chunk()  # what it holds was written: keep it
                self._close_head()
        self._low_space = True  # full until refresh() finds room again
        metrics.BUFFER_WRITE_ERRORS.labels(self.name).inc()
        self.on_dropped(events, "write_error")
        if errors := self._write_warning.hit():
            log.error(
                "file buffer: write failed; those events were not acknowledged (clients with "
                "acks send them again) and the buffer counts as full until there is room",
                extra={"destination": self.name, "directory": str(self._dir),
                       "error": str(exc), "events": events, "errors_since_last_line": errors},
            )  # fmt: skip

    def seal(self) -> None:
        self._write()
        self._open_created = None
        head = self._close_open_chunk()
        if head is None:
            return
        if head.size >= self._segment_size:
            self._close_head()
        self.on_sealed()

    def _close_open_chunk(self) -> Segment | None:
        """The frames written since the last seal become a span to take; their segment."""
        start, head = self._open_start, self._head
        lines, runs = self._open_lines, self._open_runs
        self._open_lines, self._open_runs = [], []
        if start is None or head is None:
            return None
        self._open_start = None
        self._open_events = self._open_bytes = 0
        if len(self._up) < CHUNKS_UP:
            self._up.append(_Up(head, start, head.size, lines, runs))
        tail = self._spans[-1] if self._spans else None
        if tail is not None and tail.segment is head and tail.end == start:
            tail.end = head.size  # consecutive chunks of one segment: one span
        else:
            head.live += 1
            self._spans.append(Span(head, start, head.size))
        return head

    def seal_due(self, now: float) -> float | None:
        if self._open_created is None:
            return None
        due = self._open_created + self._settings.flush_interval
        if now >= due:
            self.seal()
            return None
        return due

    def _close_head(self) -> None:
        head, fd = self._head, self._fd
        self._head = self._fd = None
        if fd is not None:
            if self._settings.fsync == "periodic" and self._dirty:
                self._unsynced.append(fd)  # closed once synced
                self._dirty = False
            else:
                os.close(fd)
        if head is not None:
            with contextlib.suppress(OSError):  # a name without totals is read all the same
                head.path = head.path.rename(head.closed_name())
            self._unref(head)

    # --- reading ----------------------------------------------------------------------------

    def take(self) -> Chunk | None:
        if self._requeued:
            return self._requeued.popleft()
        while self._spans:
            span = self._spans[0]
            chunk = self._read(span)
            if span.start >= span.end:
                self._spans.popleft()
                if span.segment.found:
                    self._reconcile(span.segment)
                self._unref(span.segment)
            if chunk is not None:
                self.on_left(chunk.tags)
                return chunk
        return None

    def _read(self, span: Span) -> Chunk | None:
        """The next chunk's worth of frames from ``span`` (advanced past them and past any
        damage); None when only damage was left."""
        settings = self._settings
        segment = span.segment
        up = self._up
        while up and (up[0].segment.seq, up[0].start) < (segment.seq, span.start):
            up.popleft()  # read from disk after all (or lost with its span)
        if up and up[0].segment is segment and up[0].start == span.start:
            kept = up.popleft()
            span.start = kept.end
            segment.live += 1
            nbytes = sum(map(len, kept.lines))
            return Chunk(kept.lines, nbytes, self._clock(), kept.runs, place=segment)
        want = settings.chunk_limit_size + READ_SLACK
        frames: list[Frame] = []
        try:
            fd = os.open(segment.path, os.O_RDONLY)
        except OSError as exc:
            self._lost(span, f"cannot open: {exc}")
            return None
        try:
            while span.start < span.end and not frames:
                data = os.pread(fd, min(want, span.end - span.start), span.start)
                if not data:
                    self._lost(span, "the file is shorter than what was written")
                    break
                final = span.start + len(data) >= span.end
                decoded = decode(data, final=final, max_bytes=settings.chunk_limit_size,
                                 max_events=settings.chunk_limit_records)  # fmt: skip
                if decoded.end == 0:  # one frame bigger than what was read
                    want = max(want * 2, len(data) * 2)
                    continue
                frames = decoded.frames
                span.start += decoded.end
                self._account(segment, decoded.damaged_bytes, decoded.damaged_events,
                              decoded.torn_bytes, decoded.torn_events)  # fmt: skip
        except OSError as exc:
            self._lost(span, f"cannot read: {exc}")
        finally:
            os.close(fd)
        if not frames:
            return None
        lines: list[bytes] = []
        tags: Runs = []
        for frame in frames:
            lines += frame.lines
            extend_runs(tags, frame.runs)
        if segment.found:
            segment.events += len(lines)
            metrics.BUFFER_REPLAYED_EVENTS.labels(self.name).inc(len(lines))
        segment.live += 1
        return Chunk(lines, sum(map(len, lines)), self._clock(), tags, place=segment)

    def _account(
        self, segment: Segment, damaged: int, damaged_events: int, torn: int, torn_events: int
    ) -> None:
        if torn and segment.torn_ok:
            log.warning(
                "file buffer: left out a write cut short by a crash (never acknowledged)",
                extra={"destination": self.name, "file": str(segment.path), "bytes": torn},
            )
        elif torn:
            damaged, damaged_events = damaged + torn, damaged_events + torn_events
        if damaged:
            self._count_damage(segment, damaged, damaged_events)

    def _reconcile(self, segment: Segment) -> None:
        """A segment found closed, read to its end: what it was closed with and is not there
        any more (a file cut short, even between two frames) is damage too."""
        if segment.totals is None:
            return
        events, nbytes = segment.totals
        missing = events - segment.events - segment.counted
        if missing > 0 or segment.size < nbytes:
            self._count_damage(segment, max(0, nbytes - segment.size), max(0, missing))

    def _count_damage(self, segment: Segment, nbytes: int, events: int) -> None:
        segment.damaged = True
        segment.counted += events
        metrics.BUFFER_CORRUPT_EVENTS.labels(self.name).inc(events)
        self.on_dropped(events, "corrupt")
        log.error(
            "file buffer: skipped damaged data; the file will be kept aside as *.damaged",
            extra={"destination": self.name, "file": str(segment.path), "bytes": nbytes,
                   "events_about": events},
        )  # fmt: skip

    def _lost(self, span: Span, why: str) -> None:
        """The rest of a span cannot be read at all."""
        log.error(
            f"file buffer: {why}; the rest of this segment is lost",
            extra={"destination": self.name, "file": str(span.segment.path),
                   "bytes": span.end - span.start},
        )  # fmt: skip
        span.segment.damaged = True
        span.start = span.end

    def requeue(self, chunk: Chunk) -> None:
        self._requeued.appendleft(chunk)

    def finish(self, chunk: Chunk) -> None:
        segment: Segment = chunk.place  # the segment its frames are in
        self._unref(segment)

    def drop_oldest(self) -> int | None:
        chunk = self._requeued.popleft() if self._requeued else None
        if chunk is None:
            if not self._spans:
                self.seal()
            chunk = self.take()
        if chunk is None:
            return None
        self.finish(chunk)
        return len(chunk.lines)

    def _unref(self, segment: Segment) -> None:
        segment.live -= 1
        if segment.live == 0 and segment is not self._head:
            self._retire(segment)

    def _retire(self, segment: Segment) -> None:
        """Everything in it is finished: delete it (keep it aside if it was damaged)."""
        self._segments.pop(segment.seq, None)
        self._disk_bytes -= segment.size
        try:
            if segment.damaged:
                self._keep_aside(segment)
            else:
                segment.path.unlink()
        except OSError as exc:
            log.error("file buffer: cannot remove a finished segment",
                      extra={"file": str(segment.path), "error": str(exc)})  # fmt: skip
        self._publish()

    def _keep_aside(self, segment: Segment) -> None:
        kept = keep_aside(segment)
        log.error("file buffer: damaged segment kept aside for inspection",
                  extra={"destination": self.name, "file": str(kept)})  # fmt: skip

    # --- upkeep -----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Check the free space (a write error also says full until this finds room)."""
        try:
            st = os.statvfs(self._dir)
        except OSError:
            return
        self._low_space = st.f_bavail * st.f_frsize <= self._settings.free_space_reserve
        self._publish()

    def _publish(self) -> None:
        self._m_disk.set(self._disk_bytes)
        self._m_segments.set(len(self._segments))

    async def _sync_periodically(self) -> None:
        interval = self._settings.fsync_interval
        while True:
            await asyncio.sleep(interval)
            await self._sync()

    async def _sync(self) -> None:
        fds, self._unsynced = self._unsynced, []
        if self._dirty and self._fd is not None:
            self._dirty = False
            fds.append(os.dup(self._fd))  # the head may be closed meanwhile
        for fd in fds:
            try:
                await asyncio.to_thread(os.fdatasync, fd)
            except OSError as exc:
                log.error("file buffer: fsync failed", extra={"error": str(exc)})
            finally:
                os.close(fd)

    async def close(self) -> str:
        """Write and seal what is pending, sync, release the lock; say what stays on disk."""
        self.seal()
        if self._syncer is not None:
            self._syncer.cancel()
        if self._settings.fsync != "off":
            await self._sync()
        self._close_head()
        if self._lock is not None:
            os.close(self._lock)  # the lock goes with it
            self._lock = None
        kept = sum(s.size for s in self._segments.values())
        self._publish()
        if not kept:
            return ""
        metrics.BUFFER_KEPT_BYTES.labels(self.name).inc(kept)
        return f"{kept} bytes in {len(self._segments)} segment(s) kept in {self._dir}"

