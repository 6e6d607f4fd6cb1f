"""Newline-delimited JSON files in a directory, rotated by size.

The file being written is named ``PREFIX.<start>.w<worker>.<n>.ndjson.part``; at ``rotate_size``
and at shutdown it is renamed without ``.part``, and a worker that starts completes the ``.part``
files an earlier process of its index left behind. So a reader that takes ``*.ndjson`` only ever
sees complete files, and every write is whole lines (one ``write`` per chunk), so even a
``.part`` file holds only whole events, except after a crash mid-write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from aggregator.config.model import FileDestination
from aggregator.sinks.base import DELIVERED, RetryableError, WriteResult

PART_SUFFIX = ".part"

log = logging.getLogger(__name__)


class FileSink:
    def __init__(self, settings: FileDestination, worker: int = 0) -> None:
        self._dir = Path(settings.path)
        self._prefix = settings.prefix
        self._rotate_size = settings.rotate_size
        self._worker = worker
        self._lock = asyncio.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._seq = 0
        self._started = time.strftime("%Y%m%dT%H%M%S", time.gmtime())

    async def start(self) -> None:
        await asyncio.to_thread(self._recover)

    def _recover(self) -> None:
        """Complete the files an earlier process with this worker index left open (it crashed
        or was killed): their lines are whole but for, at worst, a cut last one."""
        self._dir.mkdir(parents=True, exist_ok=True)
        for path in self._dir.glob(f"{self._prefix}.*.w{self._worker}.*.ndjson{PART_SUFFIX}"):
            log.warning(
                "completing a file left open by an earlier process", extra={"file": str(path)}
            )
            path.rename(path.with_name(path.name.removesuffix(PART_SUFFIX)))

    async def write(self, lines: list[bytes]) -> WriteResult:
        data = b"".join(lines)
        async with self._lock:
            try:
                await asyncio.to_thread(self._write, data)
            except OSError as exc:  # disk full, permissions: may pass, and the buffer retries
                raise RetryableError("file_error", f"{self._dir}: {exc}") from exc
        return DELIVERED

    async def close(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._finish)

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self._open()
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)
        if self._size >= self._rotate_size:
            self._finish()

    def _open(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        while True:
            # A worker restarted within the second of its predecessor gets the same <start>:
            # skip every name already taken, complete or not, rather than append to it.
            self._seq += 1
            name = f"{self._prefix}.{self._started}.w{self._worker}.{self._seq:05d}.ndjson"
            final = self._dir / name
            self._path = self._dir / (name + PART_SUFFIX)
            if final.exists():
                continue
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                self._fd = os.open(self._path, flags, 0o644)
            except FileExistsError:
                continue
            break
        self._size = 0

    def _finish(self) -> None:
        if self._fd is None or self._path is None:
            return
        os.close(self._fd)
        self._fd = None
        self._path.rename(self._path.with_name(self._path.name.removesuffix(PART_SUFFIX)))
        self._path = None
