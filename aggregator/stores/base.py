"""What every chunk store is to its destination's flusher: where events wait to be delivered.

A store takes a destination's encoded lines as they are admitted, groups them into chunks
(sealed at ``chunk_limit_size``, ``chunk_limit_records`` or ``flush_interval`` of age), and
gives the sealed chunks to the flusher, oldest first, one at a time. The flusher owns delivery
(attempts, retries, the secondary); the store owns bytes: their memory or their files, and the
``total_limit_size`` they count against.

``memory`` holds everything in the worker's memory, ``file`` writes every line to disk before it
is acknowledged and reads a chunk back only when its turn comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aggregator.delivery import RetryState

Tagged = tuple[str, list[bytes]]
"""Lines of one tag, in order."""
Runs = list[tuple[str, int, int]]
"""``(tag, count, nbytes)``: consecutive lines of one tag, how many and their bytes."""


def extend_runs(runs: Runs, more: Iterable[Sequence[Any]]) -> None:
    """Add ``more`` runs after ``runs``, a run of the same tag as the last one joined to it."""
    for tag, count, nbytes in more:
        if runs and runs[-1][0] == tag:
            _, was, was_bytes = runs[-1]
            runs[-1] = (tag, was + count, was_bytes + nbytes)
        else:
            runs.append((tag, count, nbytes))


@dataclass(slots=True)
class Chunk:
    lines: list[bytes]
    nbytes: int
    created: float
    tags: Runs
    """The runs over ``lines``: each line's tag (for the hand-off at stop), and the bytes of
    each run (for the tenants' buffer shares)."""
    retry: RetryState = field(default_factory=RetryState)
    held: int = 0
    """Bytes the flusher counts it for while it holds it."""
    place: Any = None
    """The store's own business (where a file store has it on disk)."""

    def keep(self, lines: list[bytes]) -> None:
        """Only ``lines`` (some of this chunk's, in order) are left to deliver: the others go,
        and the memory they held with them."""
        if len(lines) == len(self.lines):
            return
        self.tags = [(tag, len(run), sum(map(len, run))) for tag, run in tagged(self, lines)]
        self.lines = lines
        self.nbytes = sum(map(len, lines))


def tagged(chunk: Chunk, lines: list[bytes]) -> list[Tagged]:
    """``lines`` (all of ``chunk``'s or a subset, in order) grouped in runs of one tag."""
    if lines is chunk.lines:
        out: list[Tagged] = []
        i = 0
        for tag, count, _ in chunk.tags:
            out.append((tag, chunk.lines[i : i + count]))
            i += count
        return out
    tag_of: dict[int, str] = {}
    i = 0
    for tag, count, _ in chunk.tags:
        for line in chunk.lines[i : i + count]:
            tag_of[id(line)] = tag
        i += count
    out = []
    for line in lines:
        tag = tag_of[id(line)]
        if out and out[-1][0] == tag:
            out[-1][1].append(line)
        else:
            out.append((tag, [line]))
    return out


class Commit:
    """The next group write of a store that writes before it acknowledges: what was appended
    in this turn of the event loop is safe once it is written. Callbacks learn whether it was
    (False: a write error; those events are not in the store)."""

    __slots__ = ("_callbacks", "ok")

    def __init__(self) -> None:
        self._callbacks: list[Callable[[bool], None]] = []
        self.ok: bool | None = None

    def then(self, callback: Callable[[bool], None]) -> None:
        if self.ok is None:
            self._callbacks.append(callback)
        else:
            callback(self.ok)

    async def wait(self) -> bool:
        if self.ok is not None:
            return self.ok
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def settled(ok: bool) -> None:
            if not done.done():
                done.set_result(ok)

        self._callbacks.append(settled)
        return await done

    def settle(self, ok: bool) -> None:
        self.ok = ok
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(ok)


class ChunkStore(Protocol):
    """A destination's store, used by its flusher and (for admission) by the pipeline."""

    durable: bool
    """True when what it holds survives the process (it is on disk)."""
    on_sealed: Callable[[], None]
    """Called when a chunk is sealed: the flusher wakes up to take it."""
    on_dropped: Callable[[int, str], None]
    """Called with events the store lost, and why (a write error, damage on disk)."""
    on_left: Callable[[Runs], None]
    """Called with the runs of what leaves the store (a chunk taken or dropped by drop_oldest,
    lines never written): the tenants' buffer shares give their bytes back."""

    @property
    def held_bytes(self) -> int:
        """What counts against ``total_limit_size``: memory for ``memory``, disk for ``file``."""

    @property
    def fill_ratio(self) -> float: ...

    def has_room(self) -> bool:
        """Whether new events may be appended now."""

    def cost(self, nbytes: int, events: int) -> int:
        """What ``events`` events of ``nbytes`` count against total_limit_size here."""

    async def start(self) -> None:
        """Open files, find what an earlier process left (replayed through the normal path)."""

    def append(self, tag: str, lines: list[bytes], nbytes: int) -> Commit | None:
        """Add encoded lines of one tag. None: they are in the store now; a :class:`Commit`:
        they will be once it is written (acknowledge only then)."""

    def seal(self) -> None:
        """Seal the open chunk now (a flush, the stop)."""

    def seal_due(self, now: float) -> float | None:
        """Seal the open chunk if it is ``flush_interval`` old at ``now``; when the next one is
        due (None: no open chunk)."""

    def take(self) -> Chunk | None:
        """The oldest sealed chunk, its lines in memory; None when none is sealed."""

    def requeue(self, chunk: Chunk) -> None:
        """Give a taken chunk back, to be taken first (the stop: for a hand-off, or to stay)."""

    def finish(self, chunk: Chunk) -> None:
        """Done with a taken chunk (delivered, handed on or dropped): free what it holds."""

    def drop_oldest(self) -> int | None:
        """Discard the oldest sealed chunk not taken (``drop_oldest_chunk``): its event count,
        or None when there is none."""

    @property
    def queued(self) -> bool:
        """Whether anything is open or sealed and not taken."""

    @property
    def volatile_events(self) -> int:
        """Events held (not taken) that a crash now would lose."""

    def refresh(self) -> None:
        """Periodic upkeep (once a second or so): e.g. check the disk's free space."""

    async def close(self) -> str:
        """Release files; what is left behind, for the stop's summary ("" when nothing)."""
