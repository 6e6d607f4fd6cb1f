"""fluent-plugin-concat (2.6): the lines a sender split, joined back into one event.

Its modes, as the plugin has them: Docker's partial metadata (``use_partial_metadata``: Docker
19.03+ marks each part of a line over 16 KiB with ``partial_message``, ``partial_id``,
``partial_ordinal`` and ``partial_last``), a partial flag (``partial_key`` / ``partial_value``),
a number of lines (``n_lines``), and multiline regexps (``multiline_start_regexp``,
``multiline_end_regexp``, ``continuous_line_regexp``). Events without ``key`` pass unchanged.

What is held waits in memory. A stream whose last part came ``flush_interval`` ago is let go:
its parts, joined, go on as one event (the plugin sends it to Fluentd's @ERROR label, or to
``timeout_label``), counted (``aggregator_filter_events_total{outcome="let_go"}``). So do the
oldest streams when a filter holds more than MAX_HELD_BYTES or MAX_STREAMS, and every stream
at the stop: nothing is held forever or without bound.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aggregator import metrics
from aggregator.config.model import Concat as Settings
from aggregator.ruby import RubyRegex, compile_slashed, to_s

MAX_HELD_BYTES = 64 * 1024 * 1024
MAX_STREAMS = 10_000
"""What one concat filter holds at most in a worker; past it the oldest streams are let go."""

_PARTIAL_FIELDS = ("partial_message", "partial_id", "partial_ordinal", "partial_last")

Item = tuple[Any, dict[str, Any]]
"""An event held: its time and record."""
Released = tuple[str, list[Any]]
"""An event let go: its tag and ``[time, record]``."""


@dataclass(slots=True)
class _Stream:
    tag: str
    items: list[Item] = field(default_factory=list)
    size: int = 0
    """The plugin's measure of what is held (for buffer_limit_size)."""
    held: int = 0
    """Bytes of ``key`` held (for MAX_HELD_BYTES)."""
    touched: float = 0.0


def _regexp(text: str | None) -> RubyRegex | None:
    return None if text is None else compile_slashed(text)


class Concat:
    def __init__(
        self, settings: Settings, name: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._key = settings.key
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._held = 0
        self._released: list[Released] = []  # let go past the limits, for the next expired()
        self._start = _regexp(settings.multiline_start_regexp)
        self._end = _regexp(settings.multiline_end_regexp)
        self._continuous = _regexp(settings.continuous_line_regexp)
        s = settings
        if s.use_partial_metadata:
            self._mode, self._indicator = "partial_metadata", "partial_message"
        elif s.partial_key is not None:
            self._mode, self._indicator = "partial", s.partial_key
        elif s.n_lines is not None:
            self._mode, self._indicator = "line", s.key
        else:
            self._mode, self._indicator = "regexp", s.key
        self._joined = metrics.tally(metrics.FILTER_EVENTS.labels(name, "joined"))
        self._let_go = metrics.tally(metrics.FILTER_EVENTS.labels(name, "let_go"))
        self._held_gauge = metrics.FILTER_HELD_BYTES.labels(name)

    @property
    def holding(self) -> bool:
        return bool(self._streams)

    def run(self, tag: str, entries: list[Any]) -> list[Any]:
        key, indicator = self._key, self._indicator
        for entry in entries:  # (a loop, not any(): most messages hold one event)
            record = entry[1]
            if isinstance(record, dict) and indicator in record and key in record:
                break
        else:
            return entries  # nothing for this filter: the common case, in one pass
        out: list[Any] = []
        s = self.settings
        for entry in entries:
            t, record = entry[0], entry[1]
            if not isinstance(record, dict) or key not in record or indicator not in record:
                out.append(entry)
                continue
            for first_time, new_record in self._process(tag, t, record):
                merged = {**record, **new_record}
                if self._mode == "partial" and not s.keep_partial_key:
                    merged.pop(self._indicator, None)
                elif self._mode == "partial_metadata" and not s.keep_partial_metadata:
                    for name in _PARTIAL_FIELDS:
                        merged.pop(name, None)
                out.append([first_time if s.use_first_timestamp else t, merged])
        while self._streams and (self._held > MAX_HELD_BYTES or len(self._streams) > MAX_STREAMS):
            self._released.append(self._release(next(iter(self._streams))))
        return out

    def expired(self) -> list[Released]:
        """What is let go now: streams whose last part came flush_interval ago (0: none), and
        those let go past the limits since the last call."""
        out, self._released = self._released, []
        interval = self.settings.flush_interval
        now = self._clock()
        while interval and self._streams:
            identity, stream = next(iter(self._streams.items()))
            if now - stream.touched < interval:
                break
            out.append(self._release(identity))
        self._held_gauge.set(self._held)  # once a look (a second), not once an event
        return [released for released in out if released[1]]

    def drain(self) -> list[Released]:
        """Every stream let go (the stop)."""
        out = self.expired() + [self._release(identity) for identity in list(self._streams)]
        self._held_gauge.set(0)
        return [released for released in out if released[1]]

    # --- the plugin's modes ----------------------------------------------------------------

    def _process(self, tag: str, t: Any, record: dict[str, Any]) -> list[Item]:
        s = self.settings
        who = to_s(record.get(s.stream_identity_key)) if s.stream_identity_key else None
        if self._mode == "partial_metadata":
            identity = f"{tag}:{who or ''}{to_s(record.get('partial_id'))}"
        else:
            identity = f"{tag}:{who if who is not None else 'default'}"
        stream = self._streams.get(identity)
        if stream is None:
            stream = self._streams[identity] = _Stream(tag)
        else:
            self._streams.move_to_end(identity)
        stream.touched = self._clock()
        if self._mode == "line":
            self._add(stream, t, record)
            return [self._flush(stream)] if len(stream.items) >= (s.n_lines or 0) else []
        if self._mode == "partial":
            return self._partial(stream, t, record)
        if self._mode == "partial_metadata":
            self._add(stream, t, record)
            if record.get("partial_last") != "true":
                return []
            del self._streams[identity]  # a partial_id is never used again
            return [self._flush(stream)]
        return self._multiline(stream, t, record)

    def _partial(self, stream: _Stream, t: Any, record: dict[str, Any]) -> list[Item]:
        s = self.settings
        out: list[Item] = []
        size = _record_size(record)
        force = False
        if stream.size + size > s.buffer_limit_size:
            stream.size = 0
            method = s.buffer_overflow_method
            if method == "ignore":
                self._add(stream, t, record, size=0)
            elif method == "drop":
                self._let_go.pending += len(stream.items)
                self._drop(stream)
            force = method in ("truncate", "new")
        else:
            self._add(stream, t, record, size)
        last = record.get(self._indicator) != s.partial_value
        if force or last:
            first_time, new_record = self._flush(stream)
            new_record.pop(self._indicator, None)
            out.append((first_time, new_record))
        if force and s.buffer_overflow_method == "new":
            self._add(stream, t, record, size)
            if last:
                first_time, new_record = self._flush(stream)
                new_record.pop(self._indicator, None)
                out.append((first_time, new_record))
        return out

    def _multiline(self, stream: _Stream, t: Any, record: dict[str, Any]) -> list[Item]:
        text = to_s(record.get(self._key))
        first = self._start is not None and self._start.search(text) is not None
        last = self._end is not None and self._end.search(text) is not None
        out: list[Item] = []
        if first:
            if stream.items:
                out.append(self._flush(stream))
            self._add(stream, t, record)
            if last:
                out.append(self._flush(stream))
        elif last:
            self._add(stream, t, record)
            out.append(self._flush(stream))
        elif not stream.items:
            if self._start is None:
                self._add(stream, t, record)
            else:
                out.append((t, record))
        elif self._continuous is None or self._continuous.search(text):
            self._add(stream, t, record)
        else:
            out.append(self._flush(stream))
            out.append((t, record))
        return out

    # --- what is held -----------------------------------------------------------------------

    def _add(
        self, stream: _Stream, t: Any, record: dict[str, Any], size: int | None = None
    ) -> None:
        stream.items.append((t, record))
        stream.size += _record_size(record) if size is None else size
        held = len(to_s(record.get(self._key)))
        stream.held += held
        self._held += held

    def _drop(self, stream: _Stream) -> None:
        self._held -= stream.held
        stream.items, stream.held = [], 0

    def _flush(self, stream: _Stream) -> Item:
        """The held parts joined, in the first one's record and time; the stream emptied."""
        items = stream.items
        if self._mode == "partial_metadata":
            items = sorted(items, key=lambda item: _ruby_to_i(item[1].get("partial_ordinal")))
        first_time, first = stream.items[0]
        joined = self.settings.separator.join(to_s(record.get(self._key)) for _, record in items)
        self._joined.pending += len(items)
        self._drop(stream)
        stream.size = 0
        return first_time, {**first, self._key: joined}

    def _release(self, identity: str) -> Released:
        stream = self._streams.pop(identity)
        count = len(stream.items)
        if not count:
            return stream.tag, []
        first_time, record = self._flush(stream)
        self._joined.pending -= count
        self._let_go.pending += count
        return stream.tag, [first_time if self.settings.use_first_timestamp else time.time(),
                            record]  # fmt: skip


def _record_size(record: dict[str, Any]) -> int:
    """The plugin's record_bytesize: keys' bytes and values' to_s bytes."""
    return sum(len(str(k).encode()) + len(to_s(v).encode()) for k, v in record.items())


def _ruby_to_i(value: Any) -> int:
    m = re.match(r"\s*[-+]?\d+", to_s(value))
    return int(m.group(0)) if m else 0
