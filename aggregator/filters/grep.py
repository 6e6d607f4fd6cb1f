"""Fluentd's ``grep``: keep the events whose fields match, drop those whose fields do not.

As Fluentd 1.16 reads it: top-level ``<regexp>`` rules must all match, top-level ``<exclude>``
rules drop an event when any matches; an ``<and>`` group of excludes drops it when all match,
an ``<or>`` group of regexps keeps it when any matches. A field is matched as Ruby's ``to_s``
writes it (a missing one as the empty string), with Ruby's regular expressions (searched, not
anchored).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aggregator import metrics
from aggregator.config.model import Grep as Settings
from aggregator.config.model import GrepRule
from aggregator.ruby import accessor, compile_ruby, parse_accessor, to_s

Rule = tuple[str | None, Callable[[Any], Any], Callable[[str], Any]]
"""A field's key (None: a record accessor's path), how to reach it, its regexp's search."""


def _rules(rules: list[GrepRule]) -> list[Rule]:
    out: list[Rule] = []
    for rule in rules:
        path = parse_accessor(rule.key)
        key = path[0] if len(path) == 1 and isinstance(path[0], str) else None
        out.append((key, accessor(rule.key), compile_ruby(rule.pattern).search))
    return out


def _found(rule: Rule, record: dict[str, Any]) -> bool:
    key, get, search = rule
    value = record.get(key) if key is not None else get(record)
    return search(value if type(value) is str else to_s(value)) is not None


class Grep:
    def __init__(self, settings: Settings, name: str) -> None:
        self.name = name
        self._excluded = metrics.tally(metrics.FILTER_EVENTS.labels(name, "excluded"))
        self._all = _rules(settings.regexp) + [r for g in settings.and_ for r in _rules(g.regexp)]
        self._any = [r for g in settings.or_ for r in _rules(g.regexp)]
        self._none = _rules(settings.exclude) + [r for g in settings.or_ for r in _rules(g.exclude)]
        self._not_all = [r for g in settings.and_ for r in _rules(g.exclude)]

    def run(self, tag: str, entries: list[Any]) -> list[Any]:
        keeps = self._keeps
        kept = [entry for entry in entries if keeps(entry[1])]
        self._excluded.pending += len(entries) - len(kept)
        return kept

    def _keeps(self, record: Any) -> bool:
        # Loops rather than any()/all() over generators: this runs once per event.
        if type(record) is not dict:
            return True  # Fluentd logs a failure and lets it through
        for rule in self._all:
            if not _found(rule, record):
                return False
        if self._any:
            for rule in self._any:
                if _found(rule, record):
                    break
            else:
                return False
        if self._not_all:
            for rule in self._not_all:
                if not _found(rule, record):
                    break
            else:
                return False
        for rule in self._none:  # noqa: SIM110 (the same: no generator per event)
            if _found(rule, record):
                return False
        return True
