"""Fluentd's ``parser`` filter: one field's text parsed (``<parse>`` json or regexp) into the
record.

As Fluentd 1.16's filter_parser: the parsed map replaces the record (``reserve_data``: is merged
over it; ``hash_value_field``: goes under that key; ``inject_key_prefix``: its keys prefixed).
The parser's ``time_key`` (``time`` by default) leaves the record and becomes the event's time;
without one the event's time becomes the time of parsing, as Fluentd's
``estimate_current_event`` does, unless ``reserve_time``. A record whose field is missing or
does not parse is kept as it is with ``reserve_data``, else dropped (Fluentd sends it to its
@ERROR label when ``emit_invalid_record_to_error``); counted either way
(``aggregator_filter_events_total{outcome="invalid"}``).
"""

from __future__ import annotations

import calendar
import re
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from aggregator import metrics
from aggregator.config.model import Parser as Settings
from aggregator.config.model import ParseSettings
from aggregator.ruby import accessor, compile_ruby, deleter


class ParseError(ValueError):
    pass


class Parser:
    def __init__(self, settings: Settings, name: str) -> None:
        self.name = name
        self._invalid = metrics.tally(metrics.FILTER_EVENTS.labels(name, "invalid"))
        self._s = settings
        self._get = accessor(settings.key_name)
        self._delete = deleter(settings.key_name)
        self._parse = _parser(settings.parse)

    def run(self, tag: str, entries: list[Any]) -> list[Any]:
        out = []
        s = self._s
        for entry in entries:
            t, record = entry[0], entry[1]
            raw = self._get(record) if isinstance(record, dict) else None
            parsed: tuple[Any, dict[str, Any]] | None = None
            if raw is not None:
                try:
                    parsed = self._parse(raw)
                except ParseError:  # an error while parsing: to @ERROR, or gone
                    self._invalid.pending += 1
                    continue
            if parsed is None:  # missing, or not matched
                self._invalid.pending += 1
                if s.reserve_data:
                    out.append([t, self._handled(record, {})])
                continue
            parsed_time, values = parsed
            if s.remove_key_name_field:
                self._delete(record)
            new_time = t if s.reserve_time or parsed_time is None else parsed_time
            out.append([new_time, self._handled(record, values)])
        return out

    def _handled(self, record: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        s = self._s
        if s.inject_key_prefix:
            values = {s.inject_key_prefix + k: v for k, v in values.items()}
        result = {s.hash_value_field: values} if s.hash_value_field else values
        if not s.reserve_data:
            return result
        # Fluentd merges into a copy; the record is this event's own: merged in place (the
        # same keys in the same order), without a copy of every field.
        record.update(result)
        return record


def _parser(settings: ParseSettings) -> Any:
    """``text -> (time or None, map) or None (no match)``; raises ParseError."""
    time_of = _time_reader(settings)
    key, keep = settings.time_key, settings.keep_time_key
    if settings.type == "json":

        def parse_json(raw: Any) -> tuple[Any, dict[str, Any]] | None:
            try:
                record = orjson.loads(raw)
            except (orjson.JSONDecodeError, TypeError):
                return None
            if not isinstance(record, dict):
                return None
            return _timed(record, key, keep, time_of), record

        return parse_json
    assert settings.expression is not None
    expression = compile_ruby(settings.expression)  # named groups: checked by the config

    def parse_regexp(raw: Any) -> tuple[Any, dict[str, Any]] | None:
        m = expression.search(raw if isinstance(raw, str) else str(raw))
        if m is None:
            return None
        record = {name: value for name, value in m.groupdict().items() if value is not None}
        return _timed(record, key, keep, time_of), record

    return parse_regexp


def _timed(record: dict[str, Any], key: str | None, keep: bool, time_of: Any) -> Any:
    """The event's time from ``record[key]`` (which leaves it, unless ``keep``); else now."""
    if key is None or key not in record:
        return time.time()
    value = record[key] if keep else record.pop(key)
    return time_of(value)


def _time_reader(settings: ParseSettings) -> Any:
    kind = settings.time_type or ("float" if settings.type == "json" else "string")
    if settings.time_format is not None and settings.time_type is None:
        kind = "string"
    if kind == "float":
        return _float_time
    if kind == "unixtime":
        return lambda value: float(_ruby_int(str(value).split(".")[0]))
    fmt = settings.time_format

    def string_time(value: Any) -> float:
        text = str(value)
        try:
            if fmt is None:
                return _iso_time(text)
            parsed = time.strptime(text, fmt.replace("%L", "%f").replace("%N", "%f"))
            offset = parsed.tm_gmtoff
            seconds = calendar.timegm(parsed) - (offset if offset is not None else 0)
            return float(seconds)
        except ValueError as exc:
            raise ParseError(f"invalid time {text!r}: {exc}") from None

    return string_time


def _float_time(value: Any) -> float:
    """Fluentd's float time parser: the digits before the first dot are seconds, up to nine
    after it nanoseconds; a string never fails (Ruby's to_i)."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ParseError(f"time must be a string or a number: {value!r}")
    text = str(value)
    seconds, _, fraction = text.partition(".")
    fraction = re.match(r"\d*", fraction.split(".")[0]).group(0)[:9]  # type: ignore[union-attr]
    return _ruby_int(seconds) + (int(fraction.ljust(9, "0")) / 1e9 if fraction else 0.0)


def _ruby_int(text: str) -> int:
    m = re.match(r"\s*[-+]?\d+", text)
    return int(m.group(0)) if m else 0


def _iso_time(text: str) -> float:
    """A time without a format: ISO 8601 (local time when it names no zone)."""
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.now(UTC).astimezone().tzinfo)
    return parsed.timestamp()
