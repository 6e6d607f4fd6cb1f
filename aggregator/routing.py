"""Fluentd tag patterns and the ordered route table.

Pattern semantics are Fluentd's ``<match>``: a tag is dot-separated parts; ``*`` matches within
one part, ``**`` matches zero or more parts (``a.**`` matches ``a`` and ``a.b.c``, ``**.a``
matches ``a`` and ``b.a``), ``{x,y}`` matches either alternative (alternatives are patterns
themselves), and several space-separated patterns in one ``match`` mean any of them.

Patterns are compiled once into one anchored regular expression per route. What is worked out
for a tag (its route, its tenant) is remembered in a :class:`TagCache`, so steady traffic costs
one dict lookup per message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

CACHE_LIMIT = 10_000
"""Tags remembered; a sender inventing tags cannot grow memory past this."""
CACHED_TAG_MAX_LENGTH = 256
"""Longer tags are routed but not cached: with CACHE_LIMIT this bounds the cache to a few MB
(1,000 distinct 1 MiB tags from one sender pinned 1 GB). Docker's tags are under 80."""


class PatternError(ValueError):
    pass


def _translate(pattern: str, pos: int, in_braces: bool) -> tuple[str, int]:
    """Regex source for ``pattern[pos:]`` up to the end, or to ',' / '}' inside braces."""
    out: list[str] = []
    n = len(pattern)
    while pos < n:
        c = pattern[pos]
        if in_braces and c in ",}":
            break
        if c == "*":
            if pattern.startswith("**", pos):
                pos += 2
                starts_part = pos == 2 or pattern[pos - 3] in "{,"
                if starts_part and pattern.startswith(".", pos):
                    out.append(r"(?:.*\.)?")  # '**.a' matches 'a' too
                    pos += 1
                else:
                    out.append(".*")
                continue
            out.append(r"[^.]*")
        elif c == "." and pattern.startswith("**", pos + 1):
            out.append(r"(?:\..*)?")  # 'a.**' matches 'a' too
            pos += 3
            continue
        elif c == "{":
            alternatives: list[str] = []
            pos += 1
            while True:
                alt, pos = _translate(pattern, pos, in_braces=True)
                alternatives.append(alt)
                if pos >= n:
                    raise PatternError(f"unclosed '{{' in tag pattern {pattern!r}")
                if pattern[pos] == "}":
                    break
                pos += 1  # past ','
            out.append("(?:" + "|".join(alternatives) + ")")
        elif c == "}":
            raise PatternError(f"unbalanced '}}' in tag pattern {pattern!r}")
        else:
            out.append(re.escape(c))
        pos += 1
    return "".join(out), pos


def compile_match(match: str) -> re.Pattern[str]:
    """One regex for a route's ``match``: space-separated Fluentd patterns, any may match."""
    patterns = match.split()
    if not patterns:
        raise PatternError("empty tag pattern")
    sources = []
    for pattern in patterns:
        source, _ = _translate(pattern, 0, in_braces=False)
        sources.append(source)
    return re.compile("(?:" + "|".join(sources) + r")\Z")


class Router(Generic[T]):
    """Ordered (pattern, target) routes; ``route(tag)`` gives the first match's target or None
    (each time by the patterns: callers remember it in a TagCache)."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Sequence[tuple[str, T]]) -> None:
        self._routes = [(compile_match(match), target) for match, target in routes]

    def route(self, tag: str) -> T | None:
        return next((t for regex, t in self._routes if regex.match(tag)), None)


class TagCache(Generic[T]):
    """``work(tag)``, remembered by tag: at most CACHE_LIMIT tags (then it starts again), and
    none longer than CACHED_TAG_MAX_LENGTH (a sender inventing tags cannot grow it)."""

    __slots__ = ("_cache", "_work")

    def __init__(self, work: Callable[[str], T]) -> None:
        self._work = work
        self._cache: dict[str, T] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()

    def __call__(self, tag: str) -> T:
        try:
            return self._cache[tag]
        except KeyError:
            pass
        value = self._work(tag)
        if len(tag) <= CACHED_TAG_MAX_LENGTH:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[tag] = value
        return value
