"""Chunk stores: where a destination's events wait for delivery. See base.py for the contract
with the flusher; ``memory`` and ``file`` are chosen by ``[destinations.X.buffer] type``."""

from __future__ import annotations

from aggregator.config.model import BufferSettings
from aggregator.stores.base import Chunk, ChunkStore, Commit, Runs, Tagged, tagged

__all__ = ["Chunk", "ChunkStore", "Commit", "Runs", "Tagged", "build_store", "tagged"]


def build_store(
    name: str, settings: BufferSettings, worker: int = 0, workers: int = 1
) -> ChunkStore:
    """The store of one destination of one worker (``workers``: how many run, for adopting the
    directories of indexes that no longer do)."""
    if settings.type == "file":
        from aggregator.stores.file import FileStore

        return FileStore(name, settings, worker, workers)
    from aggregator.stores.memory import MemoryStore

    return MemoryStore(settings)
