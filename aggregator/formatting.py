"""Events to bytes: one JSON object per event, newline-terminated, with the destination's inject.

This is the one per-event step of the hot path, so the common case is a single list
comprehension around ``orjson.dumps``; anything unusual (a record that is not a map, strings
that are not valid UTF-8, bytes values) falls back to a slower path that repairs or refuses the
message as a whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import orjson

from aggregator.config.model import Inject

_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


class InvalidEvent(ValueError):
    """An entry is not ``[time, record]`` with a map for a record."""

    reason = "bad_event"


def _default(value: object) -> object:
    """JSON for what msgpack can carry and JSON cannot: bytes, timestamps, other ext types."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, msgpack.Timestamp):
        return value.to_unix()
    if isinstance(value, msgpack.ExtType):
        return {"ext_type": value.code, "data": value.data.hex()}
    raise TypeError(f"cannot encode {type(value).__name__}")


def _scrub(value: Any) -> Any:
    """The same value with every string made valid UTF-8 (bad bytes become U+FFFD)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _dumps(record: dict[Any, Any]) -> bytes:
    try:
        return orjson.dumps(record, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError:
        # Surrogate-escaped bytes from the msgpack decoder: repair rather than lose the event.
        return orjson.dumps(_scrub(record), default=_default, option=_OPTIONS)


class _Iso8601:
    """UTC ISO 8601 with milliseconds; the date part is cached per second since events in a
    message almost always share their second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, t: float) -> str:
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((t - second) * 1000):03d}Z"


def _time_formatter(fmt: str) -> Callable[[float], object]:
    if fmt == "iso8601":
        return _Iso8601()
    if fmt == "epoch_ms":
        return lambda t: int(t * 1000)
    return lambda t: t


class Formatter:
    """Encodes the entries of one message for one destination."""

    __slots__ = ("_clock", "_format_time", "_tag_key", "_time_key")

    def __init__(self, inject: Inject, clock: Callable[[], float] = time.time) -> None:
        self._tag_key = inject.tag_key
        self._time_key = inject.time_key
        self._format_time = _time_formatter(inject.time_format)
        self._clock = clock

    def encode(self, tag: str, entries: Sequence[Any]) -> tuple[list[bytes], int]:
        """The lines for ``entries`` (``[[time, record], ...]``) and their total size.
        Raises :class:`InvalidEvent` when any entry is malformed: then nothing is encoded."""
        try:
            if self._tag_key is None and self._time_key is None:
                lines = [
                    orjson.dumps(record, default=_default, option=_OPTIONS)
                    if record.__class__ is dict
                    else _refuse(record)
                    for _, record in entries
                ]
            else:
                lines = [self._encode_injected(tag, t, record) for t, record in entries]
        except (orjson.JSONEncodeError, ValueError, TypeError):
            lines = [self._encode_checked(tag, entry) for entry in entries]
        return lines, sum(map(len, lines))

    def _encode_injected(self, tag: str, t: Any, record: Any) -> bytes:
        if record.__class__ is not dict:
            _refuse(record)
        if self._tag_key is not None:
            record[self._tag_key] = tag
        if self._time_key is not None:
            # As Fluentd's in_forward: a missing or zero time means "now".
            if not t or not isinstance(t, int | float):
                t = self._clock()
            record[self._time_key] = self._format_time(t)
        return orjson.dumps(record, default=_default, option=_OPTIONS)

    def _encode_checked(self, tag: str, entry: Any) -> bytes:
        """The slow path: validate one entry and repair its strings."""
        if not isinstance(entry, list | tuple) or len(entry) < 2:
            raise InvalidEvent(f"entry is not [time, record]: {type(entry).__name__}")
        t, record = entry[0], entry[1]
        if not isinstance(record, dict):
            _refuse(record)
        if self._tag_key is None and self._time_key is None:
            return _dumps(record)
        try:
            return self._encode_injected(tag, t, record)
        except orjson.JSONEncodeError:
            return _dumps(_scrub(record))


def _refuse(record: object) -> bytes:
    raise InvalidEvent(f"record is not a map: {type(record).__name__}")
