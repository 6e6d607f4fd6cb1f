"""What the forward protocol decoder hands out: decoded messages, and the one error it raises."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Literal, get_args

EVENT_TIME_EXT_TYPE = 0
"""The msgpack ext type code of Fluentd's EventTime (shared by the decoder and the encoder)."""

_unpack_event_time = struct.Struct(">II").unpack  # seconds, nanoseconds


def event_seconds(value: object) -> float | None:
    """The seconds of an EventTime as the decoder hands it out, else None.

    The decoder keeps every msgpack ext value as ``slice(code, data)``, built in C: a Python
    hook per event, to turn each EventTime into a float that most destinations never read,
    cost a fifth of the decoding. Whatever reads a time (the formatter) asks this."""
    if value.__class__ is slice:
        code, data = value.start, value.stop
        if code == EVENT_TIME_EXT_TYPE and len(data) == 8:
            seconds, nanoseconds = _unpack_event_time(data)
            return float(seconds + nanoseconds / 1e9)
    return None

ProtocolErrorReason = Literal[
    "not_msgpack",
    "bad_shape",
    "bad_tag",
    "message_too_large",
    "bad_compression",
]
PROTOCOL_ERROR_REASONS: tuple[ProtocolErrorReason, ...] = get_args(ProtocolErrorReason)
"""Every reason, so a metric can be given each label up front."""


@dataclass(slots=True)
class Message:
    """One forward message: one tag for many entries, which is why routing works per message.

    ``entries`` are ``[time, record]`` pairs exactly as decoded and not checked one by one:
    the formatter does that later, per event, so Forward mode costs no Python work per entry.
    ``time`` is an int, a float, or an EventTime as decoded (:func:`event_seconds` reads it).
    """

    tag: str
    entries: list[list[Any]]
    chunk: str | None
    """The ``chunk`` option: when set, the server must answer ``encode_ack(chunk)``."""
    nbytes: int
    """Size of this message on the wire."""


@dataclass(slots=True)
class Batch:
    """Consecutive messages of one stream with the same tag, merged so that the server routes
    and buffers them in one step: clients that send one event per message (Message mode, as
    Docker's driver does) cost per read, not per event."""

    tag: str
    entries: list[list[Any]]
    chunks: list[str]
    """The acks owed, in message order, once the batch is accepted."""
    nbytes: int


class ProtocolError(Exception):
    """Input that is not the forward protocol; the connection that sent it must be closed.

    ``reason`` is a small fixed set (a Prometheus label); ``detail`` is for humans and logs.
    """

    def __init__(self, reason: ProtocolErrorReason, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason: ProtocolErrorReason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"
