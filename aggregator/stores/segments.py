"""A file store's directory: its lock, its segment files and what their names say, and the
adoption of directories whose worker index no longer runs.

``<path>/w<index>/lock`` is held (``flock``) by the one process using the directory. Segments
are ``<seq>.seg`` while written and ``<seq>.<events>.<bytes>.seg`` once closed, so that a file
cut short later says what it lost; a damaged one is kept aside as ``*.damaged``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".seg"
DAMAGED_SUFFIX = ".damaged"
LOCK_NAME = "lock"
_WORKER_DIR = re.compile(r"w(\d+)")
_SEGMENT = re.compile(r"(\d+)(?:\.(\d+)\.(\d+))?\.seg")


class StoreInUse(ValueError):
    """Another process holds this directory's lock."""


@dataclass(slots=True, eq=False)
class Segment:
    seq: int
    path: Path
    size: int
    live: int = 0
    """Spans and taken chunks that point into it, plus one while it is being written."""
    events: int = 0
    """Events written to it (this run), or read from it so far (found at start)."""
    totals: tuple[int, int] | None = None
    """Events and bytes it was closed with, when found closed: what reading it must find."""
    counted: int = 0
    """Events of it counted corrupt so far."""
    damaged: bool = False
    found: bool = False
    """Left by an earlier process: read at start."""
    torn_ok: bool = False
    """The last one an earlier process was writing: a frame cut at its end is a write a crash
    interrupted, never acknowledged, not damage."""

    def closed_name(self) -> Path:
        return self.path.with_name(f"{self.seq:012d}.{self.events}.{self.size}{SEGMENT_SUFFIX}")


def segment_path(directory: Path, seq: int) -> Path:
    return directory / f"{seq:012d}{SEGMENT_SUFFIX}"


def lock_directory(directory: Path) -> int:
    """Lock ``directory`` for this process; the lock's descriptor (closing it unlocks). Raises
    StoreInUse when another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreInUse(
            f"file buffer directory {directory} is in use by another process (pid {holder}): "
            "two processes never share one; give each its own path"
        ) from None
    with contextlib.suppress(OSError):  # who holds it, for the message: not on a full disk
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def scan(directory: Path) -> list[Segment]:
    """The segments in ``directory``, oldest first, with what their names say; the last one,
    if it was never closed, may end in a torn write."""
    found = []
    for path in directory.iterdir():
        if (m := _SEGMENT.fullmatch(path.name)) and path.is_file():
            totals = (int(m.group(2)), int(m.group(3))) if m.group(2) else None
            found.append(Segment(int(m.group(1)), path, path.stat().st_size, totals=totals,
                                 found=True))  # fmt: skip
    found.sort(key=lambda s: s.seq)
    if found and found[-1].totals is None:
        found[-1].torn_ok = True
    return found


def adopt(root: Path, directory: Path, worker: int, workers: int, next_seq: int) -> list[Segment]:
    """Move the segments (and damaged files) of ``root``'s worker directories whose index no
    longer runs into ``directory``, numbered from ``next_seq`` on: worker ``index % workers``
    replays them. Returns the segments moved, oldest first."""
    moved: list[Segment] = []
    for entry in sorted(root.iterdir()):
        m = _WORKER_DIR.fullmatch(entry.name)
        index = int(m.group(1)) if m and entry.is_dir() else -1
        if index < workers or index % workers != worker:
            continue
        try:
            lock = lock_directory(entry)
        except StoreInUse as exc:
            log.warning(f"file buffer: not adopting: {exc}")
            continue
        try:
            theirs = scan(entry)
            for path in sorted(entry.glob(f"*{DAMAGED_SUFFIX}")):
                path.rename(directory / f"{next_seq:012d}{path.name[path.name.index('.') :]}")
                next_seq += 1
            for segment in theirs:
                # The same name but for the number: it carries the totals it was closed with.
                name = segment.path.name
                segment.seq, next_seq = next_seq, next_seq + 1
                segment.path = segment.path.rename(
                    directory / f"{segment.seq:012d}{name[name.index('.') :]}"
                )
            moved += theirs
        finally:
            os.close(lock)
        if theirs:
            log.warning(
                "file buffer: adopting the segments of a worker index that no longer runs",
                extra={"directory": str(entry), "segments": len(theirs)},
            )
        with contextlib.suppress(OSError):
            (entry / LOCK_NAME).unlink()
            entry.rmdir()  # fails, and it stays, if it holds anything else
    return moved


def keep_aside(segment: Segment) -> Path:
    """Rename a damaged segment out of the way, for inspection; its new path."""
    return segment.path.rename(segment.path.with_name(segment.path.name + DAMAGED_SUFFIX))


def write_all(fd: int, parts: list[bytes]) -> int:
    """Write ``parts`` in full (one writev, and more only after a short write)."""
    total = sum(map(len, parts))
    written = os.writev(fd, parts)
    while written < total:  # a short write: go on from where it stopped
        written += os.write(fd, b"".join(parts)[written:])
    return total


def sync_directory(directory: Path) -> None:
    """Make a new file's name durable (with fsync on)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
