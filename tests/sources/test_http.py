"""The HTTP input as a :class:`Source`: its stop keeps the worker's deadline."""

from __future__ import annotations

import asyncio
import time

from aggregator.config.model import Config
from aggregator.pipeline import Pipeline
from aggregator.sources import build_source
from tests.sources.test_forward import run


def test_drain_closes_a_request_still_open_at_the_stops_deadline() -> None:
    cfg = Config.model_validate({
        "server": {"drain_timeout": 60},  # the runner's own timeout: the stop's comes first
        "sources": [{"type": "http", "bind": "127.0.0.1", "port": 0, "body_timeout": 60}],
        "routes": [{"match": "**", "destination": "out"}],
        "destinations": {"out": {"type": "null"}},
    })  # fmt: skip

    async def main() -> None:
        pipeline = Pipeline(cfg)
        await pipeline.start()
        source = build_source(cfg.sources[0], pipeline, cfg.server)
        await source.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", source.port)
        # A body that never comes: the request is in progress when the stop begins.
        writer.write(b"POST /app HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        await asyncio.sleep(0.2)
        source.stop_accepting()
        began = time.monotonic()
        await source.drain(began + 0.5)
        took = time.monotonic() - began
        assert await asyncio.wait_for(reader.read(), 5) is not None  # closed: EOF, no hang
        assert took < 10, f"drain took {took:.1f} s: the 60 s timeout, not the stop's deadline"
        writer.close()
        for dest in pipeline.destinations.values():
            await dest.flusher.close(time.monotonic() + 1)
            await dest.flusher.release()

    run(main)
