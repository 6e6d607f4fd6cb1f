"""The data path of one worker, from a decoded message to its destination's buffer.

Sources call :meth:`Pipeline.dispatch` once per message (one tag, many entries): the tag picks
the route, the route's destination formats the entries and appends them to its buffer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aggregator import metrics
from aggregator.buffer import Admission, Buffer
from aggregator.config.model import Config
from aggregator.delivery import SHUTDOWN_DEADLINE
from aggregator.formatting import Formatter, InvalidEvent
from aggregator.handoff import MESSAGE_EVENTS, Parcel, hand_off
from aggregator.logs import Throttle
from aggregator.routing import Router
from aggregator.sinks import build_sink
from aggregator.stopping import StopPlan

log = logging.getLogger(__name__)

UNMATCHED_WARNING_INTERVAL = 10.0
"""Seconds between two warnings about tags that match no route."""
INVALID_WARNING_INTERVAL = 10.0
"""Seconds between two warnings about events left out because they cannot be encoded."""


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
        # One router per label (Fluentd's <label>): a source sees only its label's routes.
        self._routers: dict[str | None, Router[Destination]] = {
            label: Router([(route.match, self.destinations[route.destination])
                           for route in config.routes if route.label == label])
            for label in {None, *(route.label for route in config.routes)}
        }  # fmt: skip
        self._unmatched_warning = Throttle(UNMATCHED_WARNING_INTERVAL)
        self._invalid_warning = Throttle(INVALID_WARNING_INTERVAL)

    async def start(self) -> None:
        for dest in self.destinations.values():
            await dest.buffer.sink.start()
            dest.buffer.start()

    def route(self, tag: str, label: str | None = None) -> Destination | None:
        """Where ``tag`` goes from a source with ``label``: the first matching route's."""
        return self._routers[label].route(tag)

    def dispatch(
        self, tag: str, entries: Sequence[Any], source: str, *, label: str | None = None,
        strict: bool = False,
    ) -> Outcome:  # fmt: skip
        """Route and buffer one message from ``source`` (whose routes are ``label``'s). An entry
        that cannot be encoded is left out, counted and warned about, and the rest is buffered;
        with ``strict``, it raises formatting.InvalidEvent instead, and nothing of the message
        is buffered."""
        dest = self._routers[label].route(tag)  # route(), inlined: once per read
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
        encoded = dest.formatter.encode(tag, entries, strict=strict)
        if encoded.invalid:
            self._invalid(source, tag, encoded.invalid, encoded.error)
        if encoded.lines:
            buffer.append(encoded.lines, encoded.nbytes, tag)
        return Outcome.ACCEPTED

    async def wait_for_room(self, tag: str, label: str | None = None) -> None:
        dest = self.route(tag, label)
        if dest is not None:
            await dest.buffer.wait_for_room()

    def flush_all(self) -> None:
        for dest in self.destinations.values():
            dest.buffer.flush_now()

    def abandon(self, tag: str, events: int, reason: str, label: str | None = None) -> None:
        """Count events a source took from a client but could not hand to a buffer."""
        dest = self.route(tag, label)
        name = dest.name if dest is not None else "none"
        metrics.DROPPED_EVENTS.labels(name, reason).inc(events)
        if dest is not None:
            dest.buffer.dropped += events

    @property
    def has_secondary(self) -> bool:
        return any(d.secondary for d in self.config.destinations.values())

    async def close(self, plan: StopPlan, handoff: tuple[str, int] | None = None) -> None:
        """Flush every buffer until ``plan.flush_until``; hand what is left to ``handoff`` until
        ``plan.handoff_until``; then to the secondaries, which write until ``plan.end``."""
        secondaries = {d.secondary for d in self.config.destinations.values() if d.secondary}
        primaries = [d for n, d in self.destinations.items() if n not in secondaries]
        if handoff is not None:
            for dest in primaries:
                dest.buffer.leftovers = []
        await asyncio.gather(*(dest.buffer.close(plan.flush_until) for dest in primaries))
        if handoff is not None:
            await self._hand_off(handoff, primaries, plan.handoff_until)
        await asyncio.gather(*(self.destinations[n].buffer.close(plan.end) for n in secondaries))

    async def _hand_off(
        self, address: tuple[str, int], primaries: list[Destination], until: float
    ) -> None:
        sent: list[tuple[Destination, list[bytes], Parcel]] = []
        for dest in primaries:
            for tag, lines in dest.buffer.leftovers or ():
                for i in range(0, len(lines), MESSAGE_EVENTS):
                    piece = lines[i : i + MESSAGE_EVENTS]
                    parcel = Parcel.of(tag, [dest.formatter.entry_of(line) for line in piece])
                    sent.append((dest, piece, parcel))
            dest.buffer.leftovers = None
        if not sent:
            return
        await hand_off(address, [parcel for _, _, parcel in sent], until)
        for dest, lines, parcel in sent:
            if parcel.acked:
                metrics.HANDOFF_EVENTS.labels(dest.name).inc(len(lines))
                dest.buffer.handed_off += len(lines)
            else:
                dest.buffer.hand_on(lines, SHUTDOWN_DEADLINE)

    def _invalid(self, source: str, tag: str, events: int, error: str) -> None:
        metrics.INPUT_ERRORS.labels(source, InvalidEvent.reason).inc(events)
        if due := self._invalid_warning.hit(events):
            log.warning(
                "events left out: they cannot be encoded",
                extra={"source": source, "tag": tag, "events": due, "error": error[:200]},
            )

    def _unmatched(self, tag: str, events: int) -> None:
        metrics.UNMATCHED_EVENTS.inc(events)
        if due := self._unmatched_warning.hit(events):
            log.warning("no route matches tag; events discarded", extra={"tag": tag, "events": due})
