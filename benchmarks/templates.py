"""Forward messages encoded once, then stamped per send: the load generator's whole encoder.

msgpack-encoding every event would make the generator cost as much CPU as the server it
measures. Every field of a benchmark record has a fixed width, so each message is encoded once
with placeholders, their offsets are found, and a send only overwrites those bytes: the send
time (19 decimal digits inside ``log``, and the EventTime of each entry) and, with acks, the
24-character ``chunk`` id.

Records look like those of Docker's ``fluentd`` log driver::

    {"container_id": "<64 hex>", "container_name": "/ecs-app-3", "source": "stdout",
     "log": "<19-digit time.time_ns() at send> <padding>"}

and their JSON line (as the aggregator delivers it, newline included) is ``event_size`` bytes.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import struct
from typing import Literal

import orjson

from aggregator.protocol import EventTime, encode_forward, encode_message, encode_packed_forward

Mode = Literal["message", "forward", "packed"]
MODES: tuple[Mode, ...] = ("message", "forward", "packed")

TIME_DIGITS = 19
"""``time.time_ns()`` in decimal: 19 digits from 2001 to 2286."""
CHUNK_ID_SIZE = 24
"""base64 of 16 bytes, as Fluentd's out_forward and fluent-logger-golang make chunk ids."""
CONTAINERS = 8
"""Distinct containers (ids, names, tags) that connections take turns to be."""

_NS_PER_S = 1_000_000_000
_EVENT_TIME = struct.Struct(">II")
_EXT8_HEADER = b"\xd7\x00"  # msgpack fixext 8, type 0: how every EventTime is encoded
_CHUNK_PLACEHOLDER = "C" * CHUNK_ID_SIZE
_WORDS = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "


def container_id(container: int) -> str:
    return hashlib.sha256(b"bench-container-%d" % container).hexdigest()


def container_tag(container: int) -> str:
    """Docker's default fluentd tag, ``{{.ID}}``: the short container id."""
    return container_id(container)[:12]


def padding(size: int) -> str:
    """Readable filler that needs no JSON escaping and holds neither digits nor uppercase
    letters, so that no placeholder can be mistaken for it."""
    repeats = size // len(_WORDS) + 1
    return (_WORDS * repeats)[:size].decode("ascii")


def make_record(container: int, event_size: int, stamp: str) -> dict[str, str]:
    """A record whose JSON line is ``event_size`` bytes; ``stamp`` is 19 characters."""
    if len(stamp) != TIME_DIGITS:
        raise ValueError(f"stamp must be {TIME_DIGITS} characters: {stamp!r}")
    record = {
        "container_id": container_id(container),
        "container_name": f"/ecs-app-{container}",
        "source": "stdout",
        "log": stamp + " ",
    }
    filler = event_size - len(orjson.dumps(record)) - 1  # the newline the aggregator appends
    if filler < 0:
        raise ValueError(f"event size must be at least {event_size - filler} bytes")
    record["log"] += padding(filler)
    return record


def _time_placeholder(index: int) -> EventTime:
    # Values a real clock does not produce soon, distinct per entry so each is found once.
    return EventTime(0xEE000000 + index, 999_000_000 - index)


def _digits_placeholder(index: int) -> str:
    return f"T{index:0{TIME_DIGITS - 1}d}"


def _find_once(data: bytes, needle: bytes) -> int:
    offset = data.find(needle)
    if offset < 0 or data.find(needle, offset + 1) >= 0:
        raise AssertionError(f"placeholder {needle!r} not found exactly once")
    return offset


class MessageTemplate:
    """One forward message (``events`` entries) with its time and chunk id left open."""

    __slots__ = ("_buf", "_chunk_offset", "_digit_offsets", "_time_offsets", "events", "size")

    def __init__(self, mode: Mode, container: int, events: int, event_size: int, ack: bool) -> None:
        if mode == "message" and events != 1:
            raise ValueError("message mode carries one event per message")
        if events < 1:
            raise ValueError("a message carries at least one event")
        tag = container_tag(container)
        entries = [
            (_time_placeholder(i), make_record(container, event_size, _digits_placeholder(i)))
            for i in range(events)
        ]
        chunk = _CHUNK_PLACEHOLDER if ack else None
        if mode == "message":
            encoded = encode_message(tag, *entries[0], chunk=chunk)
        elif mode == "forward":
            encoded = encode_forward(tag, entries, chunk=chunk)
        elif mode == "packed":
            encoded = encode_packed_forward(tag, entries, chunk=chunk)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        self._digit_offsets = tuple(
            _find_once(encoded, _digits_placeholder(i).encode()) for i in range(events)
        )
        self._time_offsets = tuple(
            _find_once(encoded, _EXT8_HEADER + _EVENT_TIME.pack(t.seconds, t.nanoseconds)) + 2
            for t in (_time_placeholder(i) for i in range(events))
        )
        self._chunk_offset = _find_once(encoded, chunk.encode()) if chunk else None
        self._buf = bytearray(encoded)
        self.events = events
        self.size = len(encoded)

    @property
    def needs_chunk(self) -> bool:
        return self._chunk_offset is not None

    def stamp(self, now_ns: int, chunk: bytes | None = None) -> bytes:
        """The message sent at ``now_ns`` (``time.time_ns()``), with ``chunk`` when acked."""
        buf = self._buf
        digits = b"%019d" % now_ns
        for offset in self._digit_offsets:
            buf[offset : offset + TIME_DIGITS] = digits
        event_time = _EVENT_TIME.pack(*divmod(now_ns, _NS_PER_S))
        for offset in self._time_offsets:
            buf[offset : offset + 8] = event_time
        if self._chunk_offset is not None:
            if chunk is None or len(chunk) != CHUNK_ID_SIZE:
                raise ValueError(f"this template needs a {CHUNK_ID_SIZE}-byte chunk id")
            buf[self._chunk_offset : self._chunk_offset + CHUNK_ID_SIZE] = chunk
        return bytes(buf)


class ChunkIds:
    """Unique chunk ids for one connection: a random prefix and a counter, base64-encoded, so
    that they look like out_forward's and never repeat within a run."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(8)
        self._counter = itertools.count()

    def __next__(self) -> bytes:
        return base64.b64encode(self._prefix + next(self._counter).to_bytes(8, "big"))

    def __iter__(self) -> ChunkIds:
        return self
