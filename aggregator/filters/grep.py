"""Fluentd's ``grep``: keep the events whose fields match, drop those whose fields do not.

As Fluentd 1.16 reads it: top-level ``<regexp>`` rules must all match, top-level ``<exclude>``
rules drop an event when any matches; an ``<and>`` group of excludes drops it when all match,
an ``<or>`` group of regexps keeps it when any matches. A field is matched as Ruby's ``to_s``
writes it (a missing one as the empty string), with Ruby's regular expressions (searched, not
anchored).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from aggregator import metrics
from aggregator.config.model import Grep as Settings
from aggregator.config.model import GrepRule
from aggregator.filters.ruby import accessor, compile_ruby, to_s

Rule = tuple[Callable[[Any], Any], re.Pattern[str]]


def _rules(rules: list[GrepRule]) -> list[Rule]:
    return [(accessor(rule.key), compile_ruby(rule.pattern)) for rule in rules]


class Grep:
    def __init__(self, settings: Settings, name: str) -> None:
        self.name = name
        self._excluded = metrics.tally(metrics.FILTER_EVENTS.labels(name, "excluded"))
        self._all = _rules(settings.regexp) + [r for g in settings.and_ for r in _rules(g.regexp)]
        self._any = [r for g in settings.or_ for r in _rules(g.regexp)]
        self._none = _rules(settings.exclude) + [r for g in settings.or_ for r in _rules(g.exclude)]
        self._not_all = [r for g in settings.and_ for r in _rules(g.exclude)]

    def run(self, tag: str, entries: list[Any]) -> list[Any]:
        kept = [entry for entry in entries if self._keeps(entry[1])]
        self._excluded.pending += len(entries) - len(kept)
        return kept

    def _keeps(self, record: Any) -> bool:
        if not isinstance(record, dict):
            return True  # Fluentd logs a failure and lets it through
        if any(not rx.search(to_s(get(record))) for get, rx in self._all):
            return False
        if self._any and not any(rx.search(to_s(get(record))) for get, rx in self._any):
            return False
        if self._not_all and all(rx.search(to_s(get(record))) for get, rx in self._not_all):
            return False
        return not any(rx.search(to_s(get(record))) for get, rx in self._none)
