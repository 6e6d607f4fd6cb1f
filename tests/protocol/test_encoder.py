"""The encoders, checked against the wire format itself (plain msgpack), not against our decoder."""

from __future__ import annotations

import base64
import gzip
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.protocol import (
    EventTime,
    ProtocolError,
    decode_ack,
    encode_ack,
    encode_forward,
    encode_message,
    encode_packed_forward,
    new_chunk_id,
    pack_entries,
)


def unpack(data: bytes) -> Any:
    # raw=True keeps bin and str apart, so the tests see which one went on the wire
    return msgpack.unpackb(data, raw=True, strict_map_key=False)


def unpack_stream(data: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    return list(unpacker)


# --- EventTime --------------------------------------------------------------------------------


def test_event_time_wire_form() -> None:
    ext = EventTime(1_700_000_000, 123).to_msgpack()
    assert ext == msgpack.ExtType(0, struct.pack(">II", 1_700_000_000, 123))
    # fixext 8 with type 0, as Fluentd writes it
    assert encode_message("t", EventTime(1, 2), {})[3:13] == b"\xd7\x00" + struct.pack(">II", 1, 2)


@pytest.mark.parametrize(
    ("seconds", "nanoseconds"), [(-1, 0), (2**32, 0), (0, -1), (0, 1_000_000_000)]
)
def test_event_time_rejects_out_of_range(seconds: int, nanoseconds: int) -> None:
    with pytest.raises(ValueError):
        EventTime(seconds, nanoseconds)


def test_event_time_from_float() -> None:
    assert EventTime.from_float(1.5) == EventTime(1, 500_000_000)
    assert EventTime.from_float(10) == EventTime(10, 0)
    assert EventTime.from_float(1.9999999999) == EventTime(2, 0)  # rounding carries over


@settings(max_examples=100)
@given(st.floats(min_value=0, max_value=2**32 - 1, allow_nan=False))
def test_event_time_from_float_is_within_float_precision(t: float) -> None:
    event_time = EventTime.from_float(t)
    assert event_time.seconds + event_time.nanoseconds / 1e9 == pytest.approx(t, abs=1e-6)
    assert event_time.seconds == math.floor(t) or event_time.nanoseconds == 0


def test_unknown_types_are_refused() -> None:
    with pytest.raises(TypeError):
        encode_message("t", 1, {"x": object()})


# --- the modes --------------------------------------------------------------------------------


def test_message_mode_without_options_has_three_items() -> None:
    assert unpack(encode_message("app", 1, {"a": "b"})) == [b"app", 1, {b"a": b"b"}]


def test_message_mode_with_chunk() -> None:
    wire = unpack(encode_message("app", 1.5, {}, chunk="id"))
    assert wire == [b"app", 1.5, {}, {b"chunk": b"id"}]


def test_forward_mode() -> None:
    entries = [(1, {"a": 1}), [EventTime(2, 3), {"b": 2}]]
    tag, wire_entries, option = unpack(encode_forward("app", entries, chunk="id"))
    assert tag == b"app"
    event_time = msgpack.ExtType(0, struct.pack(">II", 2, 3))
    assert wire_entries == [[1, {b"a": 1}], [event_time, {b"b": 2}]]
    assert option == {b"size": 2, b"chunk": b"id"}


def test_forward_mode_option_without_chunk() -> None:
    assert unpack(encode_forward("app", []))[2] == {b"size": 0}


def test_packed_forward_mode() -> None:
    entries = [(1, {"a": 1}), (2.5, {"b": [1, 2]})]
    tag, payload, option = unpack(encode_packed_forward("app", entries))
    assert tag == b"app"
    assert type(payload) is bytes  # sent as bin (out_forward uses str; both are allowed)
    assert unpack_stream(payload) == [[1, {"a": 1}], [2.5, {"b": [1, 2]}]]
    assert payload == pack_entries(entries)
    assert option == {b"size": 2}


def test_compressed_packed_forward_mode() -> None:
    entries = [(1, {"log": "x" * 1000})] * 20
    _, payload, option = unpack(encode_packed_forward("app", entries, chunk="c", compressed=True))
    assert option == {b"size": 20, b"compressed": b"gzip", b"chunk": b"c"}
    assert len(payload) < 1000
    assert gzip.decompress(payload) == pack_entries(entries)


# --- acks and chunk ids -----------------------------------------------------------------------


def test_ack_wire_form() -> None:
    assert encode_ack("abc==") == b"\x81\xa3ack\xa5abc=="


@settings(max_examples=100)
@given(st.text())
def test_ack_round_trip(chunk: str) -> None:
    assert decode_ack(encode_ack(chunk)) == chunk


def test_ack_gives_back_invalid_utf8_byte_for_byte() -> None:
    # A chunk id that arrived as invalid UTF-8 was decoded with surrogateescape.
    chunk = b"id\xff\xfe".decode("utf-8", "surrogateescape")
    assert encode_ack(chunk) == b"\x81\xa3ack\xa4id\xff\xfe"
    assert decode_ack(encode_ack(chunk)) == chunk


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xc1", "not_msgpack"),
        (msgpack.packb({"nack": "x"}), "bad_shape"),
        (msgpack.packb({"ack": 1}), "bad_shape"),
        (msgpack.packb(["ack", "x"]), "bad_shape"),
    ],
)
def test_decode_ack_refuses_what_is_not_an_ack(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_ack(data)
    assert info.value.reason == reason


def test_new_chunk_id() -> None:
    ids = {new_chunk_id() for _ in range(100)}
    assert len(ids) == 100
    for chunk_id in ids:
        assert len(base64.b64decode(chunk_id, validate=True)) == 16
