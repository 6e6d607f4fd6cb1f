"""Filters, as Fluentd runs them: matched by tag pattern (within their label), in config order,
on a message's events before they go to their destination's buffer.

``record_transformer``, ``grep``, ``parser`` (Fluentd's own) and ``concat``
(fluent-plugin-concat), each in its module, each a :class:`Filter`: events in, events out
(``[time, record]`` pairs). The pipeline works out each tag's chain once (:class:`FilterChain`);
a tag that no filter matches costs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

from aggregator.config.model import Config
from aggregator.config.model import Filter as FilterSettings
from aggregator.filters.concat import Concat
from aggregator.formatting import is_entry
from aggregator.routing import compile_match

Entries = list[Any]
"""``[time, record]`` pairs."""


class Filter(Protocol):
    name: str

    def run(self, tag: str, entries: Entries) -> Entries:
        """The events that go on (the ones given, changed, fewer, or joined)."""


def build(settings: FilterSettings, name: str) -> Filter:
    if settings.type == "record_transformer":
        from aggregator.filters.record_transformer import RecordTransformer

        return RecordTransformer(settings, name)
    if settings.type == "grep":
        from aggregator.filters.grep import Grep

        return Grep(settings, name)
    if settings.type == "parser":
        from aggregator.filters.parser import Parser

        return Parser(settings, name)
    if settings.type == "docker_partials":
        return Concat(settings.as_concat(), name)
    return Concat(settings, name)


class Filters:
    """Every filter of a config, in order, with where it applies."""

    def __init__(self, config: Config) -> None:
        self._all: list[tuple[str | None, re.Pattern[str], Filter]] = []
        counts: dict[str, int] = {}
        for settings in config.filters:
            counts[settings.type] = counts.get(settings.type, 0) + 1
            name = settings.name or f"{settings.type}_{counts[settings.type]}"
            filter_ = build(settings, name)
            self._all.append((settings.label, compile_match(settings.match), filter_))
        self.concats = [f for _, _, f in self._all if isinstance(f, Concat)]

    def __bool__(self) -> bool:
        return bool(self._all)

    def chain(self, label: str | None, tag: str) -> FilterChain | None:
        """The filters of ``label`` that ``tag`` matches, in order; None when there are none."""
        found = tuple(f for lbl, regex, f in self._all if lbl == label and regex.match(tag))
        return FilterChain(found) if found else None

    def label_of(self, filter_: Filter) -> str | None:
        return next(lbl for lbl, _, f in self._all if f is filter_)


class FilterChain:
    __slots__ = ("filters",)

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = tuple(filters)

    def run(self, tag: str, entries: Entries, after: Filter | None = None) -> Entries:
        """``entries`` through the chain (``after``: only the filters that follow it). Entries
        that are not ``[time, record, ...]`` (a sender's Forward or PackedForward message may
        hold anything) skip the filters and follow the others, for the formatter to leave out
        and count (bad_event)."""
        filters = self.filters
        if after is not None:
            filters = filters[filters.index(after) + 1 :] if after in filters else ()
        malformed: Entries = []
        for entry in entries:  # a loop, not all(): most messages hold one event
            if entry.__class__ is not list or len(entry) < 2:
                malformed = [e for e in entries if not is_entry(e)]
                entries = [e for e in entries if is_entry(e)]
                break
        for filter_ in filters:
            if not entries:
                break
            entries = filter_.run(tag, entries)
        return entries + malformed if malformed else entries
