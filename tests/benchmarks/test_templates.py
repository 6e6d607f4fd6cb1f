"""The load generator's messages: what a server decodes from a stamped template."""

from __future__ import annotations

import re
import time

import orjson
import pytest

from aggregator.protocol import ForwardDecoder, Message
from aggregator.protocol.events import event_seconds
from benchmarks.templates import (
    CHUNK_ID_SIZE,
    ChunkIds,
    MessageTemplate,
    Mode,
    container_id,
    make_record,
)


def decode(data: bytes) -> list[Message]:
    decoder = ForwardDecoder()
    decoder.receive_data(data)
    messages = []
    while (message := decoder.next_message()) is not None:
        messages.append(message)
    assert decoder.pending_bytes == 0
    return messages


@pytest.mark.parametrize(("mode", "events"), [("message", 1), ("forward", 7), ("packed", 7)])
def test_stamped_messages_carry_docker_shaped_records_and_the_send_time(
    mode: Mode, events: int
) -> None:
    template = MessageTemplate(mode, container=3, events=events, event_size=300, ack=False)
    now = time.time_ns()
    (message,) = decode(template.stamp(now))
    assert message.tag == container_id(3)[:12]
    assert message.chunk is None
    assert len(message.entries) == events == template.events
    for event_time, record in message.entries:
        assert set(record) == {"container_id", "container_name", "source", "log"}
        assert re.fullmatch("[0-9a-f]{64}", record["container_id"])
        assert record["container_name"] == "/ecs-app-3"
        assert record["source"] == "stdout"
        assert record["log"][:19] == str(now) and record["log"][19] == " "
        assert len(orjson.dumps(record)) + 1 == 300  # the delivered line, newline included
        assert event_seconds(event_time) == pytest.approx(now / 1e9, abs=1e-6)


def test_each_stamp_replaces_the_previous_time() -> None:
    template = MessageTemplate("forward", container=0, events=3, event_size=200, ack=False)
    first = template.stamp(1_700_000_000_000_000_001)
    second = template.stamp(1_800_000_000_123_456_789)
    assert first != second
    (message,) = decode(second)
    assert {record["log"][:19] for _, record in message.entries} == {"1800000000123456789"}
    times = [event_seconds(t) for t, _ in message.entries]
    assert times == [pytest.approx(1_800_000_000.123456789)] * 3


@pytest.mark.parametrize("mode", ["message", "forward", "packed"])
def test_acked_messages_carry_the_given_chunk_id(mode: Mode) -> None:
    events = 1 if mode == "message" else 5
    template = MessageTemplate(mode, container=1, events=events, event_size=300, ack=True)
    ids = ChunkIds()
    chunks = [next(ids) for _ in range(3)]
    messages = decode(b"".join(template.stamp(time.time_ns(), chunk) for chunk in chunks))
    assert [m.chunk for m in messages] == [c.decode() for c in chunks]
    with pytest.raises(ValueError):
        template.stamp(time.time_ns())


def test_chunk_ids_are_unique_and_shaped_like_out_forwards() -> None:
    ids = [next(generator) for generator in (ChunkIds(), ChunkIds()) for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(chunk) == CHUNK_ID_SIZE and chunk.endswith(b"=") for chunk in ids[:100])


def test_repeated_messages_decode_one_by_one() -> None:
    template = MessageTemplate("message", container=2, events=1, event_size=300, ack=False)
    assert len(decode(template.stamp(time.time_ns()) * 50)) == 50


def test_event_size_has_a_floor() -> None:
    with pytest.raises(ValueError, match="at least"):
        make_record(0, 100, "0" * 19)
    with pytest.raises(ValueError):
        MessageTemplate("message", container=0, events=2, event_size=300, ack=False)
