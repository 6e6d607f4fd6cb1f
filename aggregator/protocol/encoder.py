"""The client side of the forward protocol, and the server's one reply (the ack).

The server needs only :func:`encode_ack`; the rest serves tests, the benchmark load generator
and anything that forwards to another Fluentd-compatible server.
"""

from __future__ import annotations

import base64
import gzip
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from aggregator.protocol.events import EVENT_TIME_EXT_TYPE, ProtocolError

_EVENT_TIME = struct.Struct(">II")
_NS_PER_S = 1_000_000_000
GZIP_LEVEL = 6  # zlib's default and Fluentd's: level 9 costs far more CPU for little gain


@dataclass(frozen=True, slots=True)
class EventTime:
    """Fluentd's nanosecond timestamp: msgpack ext type 0, seconds then nanoseconds (>II)."""

    seconds: int
    nanoseconds: int

    def __post_init__(self) -> None:
        if not 0 <= self.seconds <= 0xFFFFFFFF:
            raise ValueError(f"EventTime seconds out of uint32 range: {self.seconds}")
        if not 0 <= self.nanoseconds < _NS_PER_S:
            raise ValueError(f"EventTime nanoseconds out of range: {self.nanoseconds}")

    @classmethod
    def from_float(cls, t: float) -> EventTime:
        seconds = math.floor(t)
        nanoseconds = round((t - seconds) * _NS_PER_S)
        if nanoseconds == _NS_PER_S:  # rounding carried into the next second
            seconds, nanoseconds = seconds + 1, 0
        return cls(seconds, nanoseconds)

    def to_msgpack(self) -> msgpack.ExtType:
        data = _EVENT_TIME.pack(self.seconds, self.nanoseconds)
        return msgpack.ExtType(EVENT_TIME_EXT_TYPE, data)


Time = int | float | EventTime
"""What an entry's time may be on the wire."""


def _default(obj: object) -> Any:
    if isinstance(obj, EventTime):
        return obj.to_msgpack()
    raise TypeError(f"cannot serialize {type(obj).__name__} to msgpack")


def _packb(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, default=_default, use_bin_type=True)
    return packed


def encode_ack(chunk: str) -> bytes:
    """The reply to a message that carried the ``chunk`` option."""
    # surrogateescape: a chunk id that arrived as invalid UTF-8 goes back byte for byte
    packed: bytes = msgpack.packb({"ack": chunk}, unicode_errors="surrogateescape")
    return packed


def decode_ack(data: bytes) -> str:
    """The chunk id in a server's ack (for clients and tests)."""
    try:
        reply = msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape")
    except (ValueError, TypeError) as exc:
        raise ProtocolError("not_msgpack", f"ack: {exc}") from exc
    if type(reply) is not dict or type(reply.get("ack")) is not str:
        raise ProtocolError("bad_shape", f"not an ack: {reply!r}")
    chunk: str = reply["ack"]
    return chunk


def new_chunk_id() -> str:
    """A fresh ``chunk`` option value: base64 of 16 random bytes, as out_forward makes them."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def _options(size: int | None, chunk: str | None, compressed: bool = False) -> dict[str, Any]:
    option: dict[str, Any] = {}
    if size is not None:
        option["size"] = size
    if compressed:
        option["compressed"] = "gzip"
    if chunk is not None:
        option["chunk"] = chunk
    return option


def encode_message(tag: str, time: Time, record: Any, *, chunk: str | None = None) -> bytes:
    """Message mode: ``[tag, time, record]``, plus an option map only when there is an option."""
    if chunk is None:
        return _packb([tag, time, record])
    return _packb([tag, time, record, _options(None, chunk)])


def encode_forward(
    tag: str, entries: Sequence[Sequence[Any]], *, chunk: str | None = None
) -> bytes:
    """Forward mode: ``[tag, [[time, record], ...], {size, chunk?}]``."""
    return _packb([tag, list(entries), _options(len(entries), chunk)])


def encode_packed_forward(
    tag: str,
    entries: Sequence[Sequence[Any]],
    *,
    chunk: str | None = None,
    compressed: bool = False,
) -> bytes:
    """PackedForward mode (CompressedPackedForward when ``compressed``), payload sent as bin."""
    payload = pack_entries(entries)
    if compressed:
        payload = gzip.compress(payload, compresslevel=GZIP_LEVEL, mtime=0)
    return _packb([tag, payload, _options(len(entries), chunk, compressed)])


def pack_entries(entries: Sequence[Sequence[Any]]) -> bytes:
    """Concatenated msgpack ``[time, record]`` entries: a PackedForward payload before gzip."""
    packer = msgpack.Packer(default=_default, use_bin_type=True, autoreset=False)
    for entry in entries:
        packer.pack(entry)
    payload: bytes = packer.bytes()
    return payload
