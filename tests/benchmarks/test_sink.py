"""The benchmark's sink: the emulator counting events, plus latency on /_bench/stats."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import aiohttp
import orjson

from benchmarks.sink import BenchSink


def put_record_batch(lines: list[bytes]) -> bytes:
    records = [{"Data": base64.b64encode(line).decode()} for line in lines]
    return orjson.dumps({"DeliveryStreamName": "bench", "Records": records})


async def exercise(sink: BenchSink) -> tuple[dict[str, Any], dict[str, Any]]:
    await sink.start()
    try:
        async with aiohttp.ClientSession(sink.endpoint_url) as http:
            sent = time.time_ns() - 5_000_000
            lines = [b'{"log":"%d padding"}\n' % sent] * 4
            headers = {"X-Amz-Target": "Firehose_20150804.PutRecordBatch"}
            async with http.post("/", data=put_record_batch(lines), headers=headers) as reply:
                assert (await reply.json(content_type=None))["FailedPutCount"] == 0
            async with http.get("/_bench/stats") as reply:
                stats = await reply.json()
            async with http.post("/_bench/reset") as reply:
                after_reset = await reply.json()
        return stats, after_reset
    finally:
        await sink.stop()


def test_counts_events_and_samples_latency_then_resets() -> None:
    stats, after_reset = asyncio.run(exercise(BenchSink(sample_every=2)))
    assert stats["emulator"]["accepted_events"] == 4
    assert stats["emulator"]["accepted_records"] == 4
    assert stats["latency"]["samples"] == 2
    assert stats["latency"]["p50_ms"] >= 5
    assert after_reset["emulator"]["accepted_events"] == 0
    assert after_reset["latency"]["samples"] == 0


def test_never_keeps_records() -> None:
    assert BenchSink(keep_records=True).keep_records is False
