"""The data path of one worker, from a decoded message to its destination's buffer.

Sources call :meth:`Pipeline.dispatch` once per message (one tag, many entries): the tag picks
the route, the route's destination formats the entries and appends them to its buffer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aggregator import metrics
from aggregator.buffer import Admission, Buffer
from aggregator.config.model import Config
from aggregator.formatting import Formatter
from aggregator.logs import Throttle
from aggregator.routing import Router
from aggregator.sinks import build_sink

log = logging.getLogger(__name__)

UNMATCHED_WARNING_INTERVAL = 10.0
"""Seconds between two warnings about tags that match no route."""


class Outcome(enum.Enum):
    ACCEPTED = "accepted"  # in a buffer: safe to acknowledge
    UNMATCHED = "unmatched"  # no route: counted and warned about, acknowledged as Fluentd does
    BLOCKED = "blocked"  # no room and overflow_action = block: wait_for_room(), then again
    REJECTED = "rejected"  # no room and overflow_action = throw_exception: do not acknowledge


@dataclass(slots=True)
class Destination:
    name: str
    formatter: Formatter
    buffer: Buffer


class Pipeline:
    def __init__(self, config: Config, worker: int = 0) -> None:
        self.config = config
        self.destinations: dict[str, Destination] = {}
        # Secondaries first, so that a primary's buffer can hand over to a built one.
        order = sorted(config.destinations.items(), key=lambda kv: kv[1].secondary is not None)
        for name, settings in order:
            secondary = self.destinations[settings.secondary].buffer if settings.secondary else None
            buffer = Buffer(name, settings.buffer, build_sink(name, settings, worker), secondary)
            self.destinations[name] = Destination(name, Formatter(settings.inject), buffer)
        self.router: Router[Destination] = Router(
            [(route.match, self.destinations[route.destination]) for route in config.routes]
        )
        self._unmatched_warning = Throttle(UNMATCHED_WARNING_INTERVAL)

    async def start(self) -> None:
        for dest in self.destinations.values():
            await dest.buffer.sink.start()
            dest.buffer.start()

    def dispatch(self, tag: str, entries: Sequence[Any]) -> Outcome:
        """Route and buffer one message. Raises formatting.InvalidEvent for malformed entries
        (then nothing of the message was buffered)."""
        dest = self.router.route(tag)
        if dest is None:
            self._unmatched(tag, len(entries))
            return Outcome.UNMATCHED
        buffer = dest.buffer
        admission = buffer.admit()
        if admission is Admission.BLOCKED:
            return Outcome.BLOCKED
        if admission is Admission.REJECTED:
            metrics.DROPPED_EVENTS.labels(dest.name, "buffer_full").inc(len(entries))
            return Outcome.REJECTED
        lines, nbytes = dest.formatter.encode(tag, entries)
        buffer.append(lines, nbytes)
        return Outcome.ACCEPTED

    async def wait_for_room(self, tag: str) -> None:
        dest = self.router.route(tag)
        if dest is not None:
            await dest.buffer.wait_for_room()

    def flush_all(self) -> None:
        for dest in self.destinations.values():
            dest.buffer.flush_now()

    async def close(self, deadline: float) -> None:
        """Flush every buffer until ``deadline`` (time.monotonic()). Primaries close first so
        that their leftovers reach open secondaries."""
        secondaries = {d.secondary for d in self.config.destinations.values() if d.secondary}
        primaries = [d for n, d in self.destinations.items() if n not in secondaries]
        # Keep a little of the time for the secondaries to write what the primaries hand over.
        margin = min(5.0, max(0.0, (deadline - time.monotonic()) * 0.1)) if secondaries else 0.0
        for group, group_deadline in (
            (primaries, deadline - margin),
            ([self.destinations[n] for n in secondaries], deadline),
        ):
            await asyncio.gather(*(dest.buffer.close(group_deadline) for dest in group))

    def _unmatched(self, tag: str, events: int) -> None:
        metrics.UNMATCHED_EVENTS.inc(events)
        if due := self._unmatched_warning.hit(events):
            log.warning("no route matches tag; events discarded", extra={"tag": tag, "events": due})
