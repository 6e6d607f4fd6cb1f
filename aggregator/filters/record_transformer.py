"""Fluentd's ``record_transformer`` without ``enable_ruby``: fields set from placeholders.

As Fluentd's ``PlaceholderExpander``: ``${tag}``, ``${tag_parts[N]}``, ``${tag_prefix[N]}``,
``${tag_suffix[N]}`` (N may be negative), ``${hostname}``, ``${time}``, ``${record["key"]}`` (a
top-level field). A value that is exactly one placeholder keeps the placeholder's type when
``auto_typecast`` (a number stays a number, a missing field is null); placeholders inside text
are written as Ruby's ``to_s`` writes them (a missing one as nothing). A value that starts with
``{`` or ``[`` is JSON, its strings expanded likewise. Keys are always text.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson

from aggregator.config.model import RecordTransformer as Settings
from aggregator.logs import Throttle
from aggregator.protocol.events import event_seconds
from aggregator.routing import TagCache
from aggregator.ruby import deleter, to_s

log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"(\$\{[^}]+\}|__[A-Z_]+__)")
_RECORD_FIELD = re.compile(r'\$\{record\["(.*)"\]\}')
_MISSING = object()

Values = dict[str, Any]
"""A tag's placeholders and their values."""
Lookup = Callable[[Values, dict[str, Any], Any], Any]
Expand = Callable[[Values, dict[str, Any], Any], Any]


def tag_values(tag: str, hostname: str) -> Values:
    """Every placeholder that depends on the tag alone (Fluentd's prepare_placeholders)."""
    parts = tag.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    values: Values = {"${tag}": tag, "${hostname}": hostname}
    for name, items in (("tag_parts", parts), ("tag_prefix", prefixes),
                        ("tag_suffix", suffixes)):  # fmt: skip
        size = len(items)
        for i, item in enumerate(items):
            values[f"${{{name}[{i}]}}"] = item
            values[f"${{{name}[{i - size}]}}"] = item
    return values


def time_text(t: Any) -> str:
    """Ruby's ``Time.at(t).to_s``: local time, ``2024-01-31 12:00:00 +0000``."""
    seconds = event_seconds(t) if isinstance(t, slice) else t
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(float(seconds or 0)))


class RecordTransformer:
    def __init__(self, settings: Settings, name: str) -> None:
        self.name = name
        self._renew = settings.renew_record
        self._keep = list(settings.keep_keys)
        self._renew_time_key = settings.renew_time_key
        self._delete = [deleter(key) for key in settings.remove_keys]
        self._typecast = settings.auto_typecast
        self._unknown = Throttle(60.0)
        hostname = socket.gethostname()
        self._tags: TagCache[Values] = TagCache(lambda tag: tag_values(tag, hostname))
        # Keys and values without a placeholder are kept as they are, not as functions: most
        # <record>s set a few fixed keys, and this runs once an event.
        self._fields: list[tuple[str | Expand, Expand | None, Any]] = []
        for key, value in settings.record.items():
            template = _json(value)
            expand = self._compile(template)
            # (a map or a list is made anew for each event: it may be changed downstream)
            constant = isinstance(template, str) and not _PLACEHOLDER.search(template)
            constant |= not isinstance(template, str | dict | list)
            field: str | Expand = key
            if _PLACEHOLDER.search(key):
                field = self._compile(key, stringify=True)
            self._fields.append((field, None if constant else expand, template))

    def run(self, tag: str, entries: list[Any]) -> list[Any]:
        values = self._tags(tag)
        out = []
        for entry in entries:
            t, record = entry[0], entry[1]
            if record.__class__ is not dict:
                out.append(entry)  # Fluentd fails on it (to @ERROR); it passes unchanged here
                continue
            # The record is this event's own (decoded for it): changed in place, as Fluentd
            # changes its copy, unless it is renewed.
            new = {} if self._renew else record
            for kept in self._keep:
                if kept in record:
                    new[kept] = record[kept]
            for key, expand, constant in self._fields:
                value = constant if expand is None else expand(values, record, t)
                new[key if isinstance(key, str) else key(values, record, t)] = value
            if self._renew_time_key is not None and self._renew_time_key in new:
                t = _to_f(new[self._renew_time_key])
            for delete in self._delete:
                delete(new)
            out.append(entry if new is record and t is entry[0] else [t, new])
        return out

    def _compile(self, template: Any, stringify: bool = False) -> Expand:
        """What a <record> value becomes: a function of the tag's values, the record and the
        time."""
        if isinstance(template, dict):
            fields = [(self._compile(k, True), self._compile(v)) for k, v in template.items()]
            return lambda vals, rec, t: {k(vals, rec, t): v(vals, rec, t) for k, v in fields}
        if isinstance(template, list):
            items = [self._compile(v) for v in template]
            return lambda vals, rec, t: [item(vals, rec, t) for item in items]
        if not isinstance(template, str):
            return lambda vals, rec, t: template
        pieces = _PLACEHOLDER.split(template)
        if len(pieces) == 1:
            return lambda vals, rec, t: template
        if self._typecast and not stringify and len(pieces) == 3 and not pieces[0] + pieces[2]:
            single: Expand = self._lookup(pieces[1])  # one placeholder: its own type
            return single
        parts: list[str | Lookup] = [
            self._lookup(piece) if i % 2 else piece for i, piece in enumerate(pieces) if piece
        ]

        def text(vals: Values, rec: dict[str, Any], t: Any) -> str:
            return "".join(p if isinstance(p, str) else to_s(p(vals, rec, t)) for p in parts)

        return text

    def _lookup(self, placeholder: str) -> Lookup:
        if m := _RECORD_FIELD.fullmatch(placeholder):
            field = m.group(1)
            return lambda vals, rec, t: rec.get(field)
        if placeholder == "${time}":
            return lambda vals, rec, t: time_text(t)

        def from_tag(vals: Values, rec: dict[str, Any], t: Any) -> Any:
            found = vals.get(placeholder, _MISSING)
            if found is _MISSING:
                if self._unknown.hit():
                    log.warning(
                        "record_transformer: unknown placeholder (its value is null)",
                        extra={"filter": self.name, "placeholder": placeholder},
                    )
                return None
            return found

        return from_tag


def _json(value: Any) -> Any:
    """Fluentd reads a <record> value that starts with { or [ as JSON (else it stays text)."""
    if isinstance(value, str) and value.startswith(("{", "[")):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _to_f(value: Any) -> float:
    """Ruby's ``to_f``: the leading number of a string, else 0.0."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = re.match(r"\s*[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(value))
    return float(m.group(0)) if m else 0.0
