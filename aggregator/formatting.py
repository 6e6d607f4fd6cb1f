"""Events to bytes: one JSON object per event, newline-terminated, with the destination's inject.

This is the one per-event step of the hot path, so the common case is one ``orjson.dumps`` for
many records, split into lines; anything unusual (a record that is not a map, strings
that are not valid UTF-8, bytes values or keys) falls back to a slower path that takes the
entries one by one: it repairs what can be repaired and leaves out, and counts, an entry that
cannot be encoded, so that one bad event never costs its neighbours.
"""

from __future__ import annotations

import calendar
import operator
import struct
import time
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any, NamedTuple, NoReturn

import msgpack
import orjson

from aggregator.config.model import DestinationBase, ForwardDestination, Inject
from aggregator.protocol.encoder import EventTime
from aggregator.protocol.events import EVENT_TIME_EXT_TYPE, event_seconds

_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS
"""The slow path's: non-string keys (msgpack has them) become strings, as Fluentd writes them."""
ENCODE_SLICE = 1024
"""Entries encoded in one call: bounds the transient copy of a slice's JSON to about 1 MiB."""
# The fast path encodes a whole slice in one orjson call, with this fragment between two
# records: orjson writes it as is, and never writes a raw newline of its own (it escapes those
# inside strings and adds no whitespace), so the newlines cut the output into "[r1,", ",r2,",
# ..., ",rN]": each record between one byte of syntax on either side. (A split at the newline
# alone is memchr's; at ",\n," it took twice as long.)
_BREAK = orjson.Fragment(b"\n")
_NEWLINE = b"\n"
_INSIDE = slice(1, -1)
_APPEND = orjson.OPT_APPEND_NEWLINE
_EVENT_TIME = struct.Struct(">II")


class InvalidEvent(ValueError):
    """An entry that cannot be encoded: not ``[time, record]``, a record that is not a map, a
    time that is not a date, a record nested deeper than JSON encoding allows."""

    reason = "bad_event"


class Encoded(NamedTuple):
    lines: list[bytes]
    nbytes: int
    invalid: int = 0
    """Entries left out because they cannot be encoded."""
    error: str = ""
    """Why the first of them could not be."""


def _default(value: object) -> object:
    """JSON for what msgpack can carry and JSON cannot: bytes, timestamps, ext types (an
    EventTime inside a record is its seconds, as Fluentd writes it)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, slice):  # an ext value as the forward decoder keeps it
        seconds = event_seconds(value)
        if seconds is not None:
            return seconds
        return {"ext_type": value.start, "data": bytes(value.stop).hex()}
    if isinstance(value, msgpack.Timestamp):
        return value.to_unix()
    if isinstance(value, msgpack.ExtType):
        return {"ext_type": value.code, "data": value.data.hex()}
    raise TypeError(f"cannot encode {type(value).__name__}")


def _scrub(value: Any) -> Any:
    """The same value with every string made valid UTF-8 (bad bytes become U+FFFD), and bytes
    map keys made strings (msgpack has binary keys; JSON and Fluentd's Ruby do not)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_scrub(_text_key(k)): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _text_key(key: Any) -> Any:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else key


def _dumps(record: dict[Any, Any]) -> bytes:
    try:
        return orjson.dumps(record, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError:
        pass
    # Surrogate-escaped bytes from the msgpack decoder, binary keys: repair, not lose.
    try:
        return orjson.dumps(_scrub(record), default=_default, option=_OPTIONS)
    except (orjson.JSONEncodeError, RecursionError) as exc:  # nested past orjson's 254 levels
        raise InvalidEvent(f"record cannot be encoded as JSON: {exc}") from None


class _TimeFormat:
    """Event time to the injected value. As Fluentd's in_forward does, a missing or zero time
    (or one that is not a number) means "now".

    ``parse`` is the inverse, for a hand-off: an event time that this format turns into the
    same value again. Formats that keep milliseconds give the middle of that millisecond, so
    that float rounding on the way back (seconds + nanoseconds / 1e9) cannot fall into the
    millisecond before."""

    __slots__ = ("_clock",)

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def _time(self, t: Any) -> float:
        if t.__class__ is slice:  # an EventTime as decoded (a bad one is not a number: now)
            t = event_seconds(t)
        if (t.__class__ is float or t.__class__ is int) and t:
            return float(t)
        return self._clock()

    def __call__(self, t: Any) -> object:
        seconds = self._time(t)
        if seconds - seconds != 0.0:  # NaN or infinite: no date (the other formats fail on int())
            raise ValueError(f"{seconds} is not a number of seconds")
        return seconds

    def parse(self, value: object) -> float | None:
        return float(value) if isinstance(value, int | float) else None


class _EpochMs(_TimeFormat):
    __slots__ = ()

    def __call__(self, t: Any) -> object:
        return int(self._time(t) * 1000)

    def parse(self, value: object) -> float | None:
        return (value + 0.5) / 1000 if isinstance(value, int) else None


class _Iso8601(_TimeFormat):
    """UTC ISO 8601 with milliseconds. Consecutive events mostly share their millisecond and
    nearly always their second, so both the last result and the date part are cached."""

    __slots__ = ("_ms", "_prefix", "_second", "_text")

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self._ms = self._second = -1
        self._prefix = self._text = ""

    def __call__(self, t: Any) -> object:
        ms = int(self._time(t) * 1000)
        if ms == self._ms:
            return self._text
        second = ms // 1000
        if second != self._second:
            # gmtime raises for a time no calendar has: keep the cache as it was then.
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        self._ms = ms
        self._text = f"{self._prefix}.{ms - second * 1000:03d}Z"
        return self._text

    def parse(self, value: object) -> float | None:
        if not isinstance(value, str) or len(value) != 24 or value[19] != ".":
            return None
        try:
            second = calendar.timegm(time.strptime(value[:19], "%Y-%m-%dT%H:%M:%S"))
            ms = int(value[20:23])
        except ValueError:
            return None
        return second + (ms + 0.5) / 1000


_TIME_FORMATS: dict[str, type[_TimeFormat]] = {
    "iso8601": _Iso8601,
    "epoch": _TimeFormat,
    "epoch_ms": _EpochMs,
}


class Formatter:
    """Encodes the entries of one message for one destination."""

    __slots__ = ("_format_time", "_tag_key", "_time_key")

    def __init__(self, inject: Inject, clock: Callable[[], float] = time.time) -> None:
        self._tag_key = inject.tag_key
        self._time_key = inject.time_key
        self._format_time = _TIME_FORMATS[inject.time_format](clock)

    def encode(self, tag: str, entries: Sequence[Any], *, strict: bool = False) -> Encoded:
        """The lines for ``entries`` (``[[time, record], ...]``) and their total size. An entry
        that cannot be encoded is left out and counted; with ``strict``, it raises
        :class:`InvalidEvent` instead, and nothing is encoded."""
        if len(entries) > ENCODE_SLICE:
            return self._encode_slices(tag, entries, strict)
        try:  # the common case: one slice, no copy, every entry fine
            lines, nbytes = self._encode_fast(tag, entries)
        except (orjson.JSONEncodeError, ValueError, TypeError, OverflowError, OSError):
            return self._encode_each(tag, entries, strict)
        return Encoded(lines, nbytes)

    def _encode_slices(self, tag: str, entries: Sequence[Any], strict: bool) -> Encoded:
        lines: list[bytes] = []
        nbytes = invalid = 0
        error = ""
        for start in range(0, len(entries), ENCODE_SLICE):
            part = self.encode(tag, entries[start : start + ENCODE_SLICE], strict=strict)
            lines += part.lines
            nbytes += part.nbytes
            invalid += part.invalid
            error = error or part.error
        return Encoded(lines, nbytes, invalid, error)

    def _encode_each(self, tag: str, entries: Sequence[Any], strict: bool) -> Encoded:
        """The slow path: entry by entry, each checked; what cannot be encoded is left out."""
        invalid, error = 0, ""
        lines = []
        for entry in entries:
            try:
                lines.append(self._encode_checked(tag, entry))
            except InvalidEvent as exc:
                if strict:
                    raise
                invalid += 1
                error = error or str(exc)
        # orjson returns each result in a 4 KiB allocation: kept in a buffer, a 300-byte event
        # would hold 4 KiB of memory. One join and one split (both in C; orjson escapes every
        # newline inside strings) give exact-size copies and free orjson's at once.
        if len(lines) == 1:
            # join and split hand a lone line back as it is, orjson's allocation and all: copy.
            line = bytes(memoryview(lines[0]))
            return Encoded([line], len(line), invalid, error)
        data = b"".join(lines)
        return Encoded(data.splitlines(keepends=True), len(data), invalid, error)

    def entry_of(self, line: bytes) -> list[Any]:
        """A line this formatter wrote, back as a ``[time, record]`` entry that it would encode
        to the same line (the tag is the line's own): how a hand-off sends buffered events to a
        peer that formats them again. Without an injected time, the time is not in the line and
        any will do: now."""
        record = orjson.loads(line)
        t = None
        if self._time_key is not None:
            t = self._format_time.parse(record.get(self._time_key))
        return [t or self._format_time._clock(), record]

    def _encode_fast(self, tag: str, entries: Sequence[Any]) -> tuple[list[bytes], int]:
        """Every entry's line and their total size, from one orjson call for the whole slice
        (a call per record cost twice as much, most of it allocating and freeing orjson's
        buffer). Anything unusual raises and sends the slice to the checked path: an entry that
        is not a pair, a record that is not a map (the class test), a key that is not a
        string (orjson's non-string-key option would double the cost of every record)."""
        if not entries:
            return [], 0
        tag_key, time_key, fmt = self._tag_key, self._time_key, self._format_time
        records: list[dict[Any, Any]]
        if time_key is None:
            records = [r if r.__class__ is dict else _refuse(r) for _, r in entries]
            if tag_key is not None:
                for record in records:
                    record[tag_key] = tag
        else:
            records = []
            append = records.append
            for t, record in entries:
                if record.__class__ is not dict:
                    _refuse(record)
                if tag_key is not None:
                    record[tag_key] = tag
                record[time_key] = fmt(t)
                append(record)
        if len(records) == 1:  # one message per read, as Docker's driver writes: no split
            # A copy of exactly its size: orjson's own allocation is 4 KiB (see _encode_each).
            line = bytes(memoryview(orjson.dumps(records[0], default=_default, option=_APPEND)))
            return [line], len(line)
        items: list[Any] = [_BREAK] * (2 * len(records) - 1)
        items[::2] = records
        data = orjson.dumps(items, default=_default)  # [r1,<BREAK>,r2,...]
        pieces = map(operator.getitem, data.split(_NEWLINE), repeat(_INSIDE))
        lines = list(map(operator.add, pieces, repeat(_NEWLINE)))
        # The lines' bytes: the JSON less its brackets and its breaks (",\n," between two
        # records), plus a newline a line.
        return lines, len(data) - 2 - 3 * (len(lines) - 1) + len(lines)

    def _encode_checked(self, tag: str, entry: Any) -> bytes:
        """The slow path: validate one entry and repair its strings."""
        _check_entry(entry)
        t, record = entry[0], entry[1]
        if not isinstance(record, dict):
            _refuse(record)
        if self._tag_key is not None:
            record[self._tag_key] = tag
        if self._time_key is not None:
            try:
                record[self._time_key] = self._format_time(t)
            except (ValueError, OverflowError, OSError) as exc:  # NaN, or past any calendar
                raise InvalidEvent(f"time {t!r} is not a date: {exc}") from None
        return _dumps(record)


def is_entry(entry: Any) -> bool:
    """Whether ``entry`` is ``[time, record, ...]`` (a Forward or PackedForward message may hold
    anything: the rest is left out and counted, bad_event)."""
    return isinstance(entry, list | tuple) and len(entry) >= 2


def _check_entry(entry: Any) -> None:
    if not is_entry(entry):
        raise InvalidEvent(f"entry is not [time, record]: {type(entry).__name__}")


def _refuse(record: object) -> NoReturn:
    raise InvalidEvent(f"record is not a map: {type(record).__name__}")


class ForwardFormatter(Formatter):
    """A forward destination's lines: ``[tag, seconds, nanoseconds, record]`` as JSON, so that
    its sink sends each event on with its tag and its time to the nanosecond, as out_forward
    does (a secondary file gets these lines as they are). ``inject`` applies to the record as
    for any destination. A line per call to orjson: a forward destination is not the hot path
    that Firehose's is."""

    __slots__ = ()

    def _encode_fast(self, tag: str, entries: Sequence[Any]) -> tuple[list[bytes], int]:
        raise ValueError("the checked path, always")

    def _encode_checked(self, tag: str, entry: Any) -> bytes:
        _check_entry(entry)
        seconds, nanoseconds = self._split_time(entry[0])
        line = super()._encode_checked(tag, entry)  # the record, validated and injected
        return b"[%s,%d,%d,%s]\n" % (orjson.dumps(tag), seconds, nanoseconds, line[:-1])

    def _split_time(self, t: Any) -> tuple[int, int]:
        if t.__class__ is slice and t.start == EVENT_TIME_EXT_TYPE and len(t.stop) == 8:
            seconds, nanoseconds = _EVENT_TIME.unpack(t.stop)
            if seconds:
                return seconds, nanoseconds
        if t.__class__ is int and t > 0:
            return t, 0
        if t.__class__ is float and 0 < t < 2**32:
            seconds = int(t)
            return seconds, min(round((t - seconds) * 1e9), 999_999_999)
        now = self._format_time._clock()  # missing, zero or not a time: now, as in_forward
        return int(now), int((now % 1) * 1e9)

    def entry_of(self, line: bytes) -> list[Any]:
        return line_of(line)[1]


def line_of(line: bytes) -> tuple[str, list[Any]]:
    """A :class:`ForwardFormatter` line as its tag and ``[time, record]`` entry."""
    tag, seconds, nanoseconds, record = orjson.loads(line)
    return tag, [EventTime(seconds, nanoseconds), record]


def build_formatter(settings: DestinationBase) -> Formatter:
    """The formatter a destination's lines are written with."""
    if isinstance(settings, ForwardDestination):
        return ForwardFormatter(settings.inject)
    return Formatter(settings.inject)
