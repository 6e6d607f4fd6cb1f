"""FirehoseSink end to end: against the emulator for faults, against moto for the real API."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import boto3
import pytest
from botocore.config import Config

from aggregator.config.model import FirehoseDestination
from aggregator.sinks.base import DELIVERED, RetryableError, WriteResult
from aggregator.sinks.firehose import FirehoseSink
from emulator import EmulatorThread
from tests.conftest import create_s3_stream
from tests.sinks.firehose.support import firehose_settings as settings

T = TypeVar("T")


def with_sink(config: FirehoseDestination, use: Callable[[FirehoseSink], Awaitable[T]]) -> T:
    async def go() -> T:
        sink = FirehoseSink("sink-test", config)
        await sink.start()
        try:
            return await use(sink)
        finally:
            await sink.close()

    return asyncio.run(go())


def write(config: FirehoseDestination, lines: list[bytes]) -> WriteResult:
    return with_sink(config, lambda sink: sink.write(lines))


def events(n: int, start: int = 0, pad: int = 40) -> list[bytes]:
    return [b'{"n":%d,"pad":"%s"}\n' % (i, b"x" * pad) for i in range(start, start + n)]


@pytest.mark.parametrize("aggregate", [False, True])
def test_every_line_is_delivered(emulator: EmulatorThread, aggregate: bool) -> None:
    lines = events(1200)
    assert write(settings(emulator.endpoint_url, aggregate=aggregate), lines) is DELIVERED
    assert sorted(emulator.lines("events")) == sorted(lines)
    calls = emulator.stats()["calls"]
    assert calls == (1 if aggregate else 3)  # 1200 one-line records need 3 calls of <= 500


def test_empty_chunk_is_delivered_without_a_call(emulator: EmulatorThread) -> None:
    assert write(settings(emulator.endpoint_url), []) is DELIVERED
    assert emulator.stats()["calls"] == 0


@pytest.mark.parametrize("aggregate", [False, True])
def test_oversize_lines_are_rejected_and_the_rest_delivered(
    emulator: EmulatorThread, aggregate: bool
) -> None:
    big = b'{"big":"' + b"y" * 2000 + b'"}\n'
    lines = [*events(3), big, *events(3, start=3)]
    config = settings(emulator.endpoint_url, aggregate=aggregate, record_max_size=1000)
    result = write(config, lines)
    assert result.rejected == {"record_too_large": [big]}
    assert result.retry == []
    assert emulator.lines("events") == [x for x in lines if x is not big]


@pytest.mark.parametrize("aggregate", [False, True])
def test_retrying_partial_failures_delivers_everything_once(
    emulator: EmulatorThread, aggregate: bool
) -> None:
    emulator.configure(fail_rate=0.3)
    lines = events(2000)
    # Small records so that aggregated mode also has many records, hence partial failures.
    config = settings(emulator.endpoint_url, aggregate=aggregate, record_max_size=600)

    async def until_delivered(sink: FirehoseSink) -> int:
        pending, attempts = lines, 0
        while pending:
            attempts += 1
            result = await sink.write(pending)
            assert result.rejected == {}
            assert len(result.retry) < len(pending)
            assert set(result.retry) <= set(pending)
            pending = result.retry
        return attempts

    assert with_sink(config, until_delivered) > 1
    assert sorted(emulator.lines("events")) == sorted(lines)  # no loss, no duplicate


def test_some_batches_throttled_go_to_retry_never_resending_delivered(
    emulator: EmulatorThread,
) -> None:
    emulator.configure(throttle_rate=0.5)
    config = settings(emulator.endpoint_url)
    mixed = 0

    async def attempts(sink: FirehoseSink) -> None:
        nonlocal mixed
        for round_ in range(20):
            lines = events(2000, start=round_ * 2000)  # four batches
            before = len(emulator.lines("events"))
            try:
                result = await sink.write(lines)
            except RetryableError as exc:
                assert exc.reason == "service_unavailable"
                assert len(emulator.lines("events")) == before  # nothing went through
                continue
            delivered = emulator.lines("events")[before:]
            assert sorted(delivered + result.retry) == sorted(lines)
            mixed += bool(result.retry)

    with_sink(config, attempts)
    assert mixed > 0


def test_every_batch_throttled_raises(emulator: EmulatorThread) -> None:
    emulator.configure(throttle_rate=1.0)
    with pytest.raises(RetryableError) as caught:
        write(settings(emulator.endpoint_url), events(1200))
    assert caught.value.reason == "service_unavailable"


def test_a_failed_write_leaves_no_reference_cycle(emulator: EmulatorThread) -> None:
    """A whole failure must be freed by reference counting: an error that sat in the gathered
    outcomes, raised again, tied the frames holding every batch's request body into a cycle,
    and the bodies of hundreds of failed attempts waited for a full collection (a worker with
    a 256 MiB buffer reached 1.2 GB in an outage of 503s)."""
    emulator.configure(throttle_rate=1.0)

    async def fail_often(sink: FirehoseSink) -> int:
        gc.collect()
        gc.disable()
        try:
            for _ in range(10):
                with pytest.raises(RetryableError):
                    await sink.write(events(1200))  # three batches, each refused
            return gc.collect()
        finally:
            gc.enable()

    assert with_sink(settings(emulator.endpoint_url), fail_often) == 0


def test_unknown_stream_rejects_the_chunk() -> None:
    lines = events(700)
    with EmulatorThread(streams={"known"}) as emu:
        result = write(settings(emu.endpoint_url, stream="missing"), lines)
    assert result.retry == []
    assert sorted(result.rejected["resource_not_found"]) == sorted(lines)


def test_stalled_service_times_out_as_network(emulator: EmulatorThread) -> None:
    emulator.stall()
    with pytest.raises(RetryableError) as caught:
        write(settings(emulator.endpoint_url, request_timeout=0.3), events(1200))
    assert caught.value.reason == "network"


# --- against a real moto server --------------------------------------------------------------


@pytest.mark.parametrize("aggregate", [False, True])
def test_delivers_to_moto_firehose_into_s3(moto_server: str, aggregate: bool) -> None:
    name = f"events-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_server,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    s3.create_bucket(Bucket=name)
    create_s3_stream(moto_server, name, bucket=name, prefix="logs/")
    lines = events(1500)

    result = write(settings(moto_server, stream=name, aggregate=aggregate), lines)

    assert result is DELIVERED
    objects = s3.list_objects_v2(Bucket=name, Prefix="logs/").get("Contents", [])
    assert objects  # moto writes one object per PutRecordBatch call
    body = b"".join(s3.get_object(Bucket=name, Key=o["Key"])["Body"].read() for o in objects)
    assert sorted(body.splitlines(keepends=True)) == sorted(lines)


def test_moto_unknown_stream_is_rejected(moto_server: str) -> None:
    lines = events(10)
    result = write(settings(moto_server, stream=f"missing-{uuid.uuid4().hex[:8]}"), lines)
    assert result.rejected == {"resource_not_found": lines}


def test_events_without_the_data_key_are_rejected_and_the_rest_sent_as_their_field(
    emulator: EmulatorThread,
) -> None:
    lines = [b'{"log":"one","n":1}\n', b'{"n":2}\n', b'{"log":"three","n":3}\n']
    result = write(settings(emulator.endpoint_url, data_key="log"), lines)
    assert result.rejected == {"data_key_missing": [lines[1]]} and result.retry == []
    assert emulator.records("events") == [b"one\n", b"three\n"]
