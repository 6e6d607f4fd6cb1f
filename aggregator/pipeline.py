"""The data path of one worker, from a decoded message to its destination's buffer.

Sources call :meth:`Pipeline.dispatch` once per message (one tag, many entries): the tag picks
the route and names the tenant (remembered per tag: a :class:`Ticket`), admission says whether
the events may go in now (:mod:`aggregator.admission`), and the route's destination formats the
entries and appends them to its buffer. An answer to wait is followed by :meth:`Pipeline.offer`,
the one "wait, then offer again" of every source.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from aggregator import metrics
from aggregator.admission import Admission, Refused, Sender, Shares, Tenant, Wait
from aggregator.config.model import Config
from aggregator.filters import FilterChain, Filters
from aggregator.flusher import Flusher
from aggregator.formatting import Formatter, InvalidEvent, build_formatter
from aggregator.forward_client import MESSAGE_EVENTS, Parcel, Peer
from aggregator.handoff import hand_off
from aggregator.logs import Throttle
from aggregator.routing import Router, TagCache
from aggregator.sinks import build_sink
from aggregator.stopping import StopPlan
from aggregator.stores import Chunk, Commit, build_store, tagged

log = logging.getLogger(__name__)

CONCAT_CHECK_INTERVAL = 1.0
"""Seconds between two looks for the lines concat filters hold past their flush_interval."""
UNMATCHED_WARNING_INTERVAL = 10.0
"""Seconds between two warnings about tags that match no route."""
INVALID_WARNING_INTERVAL = 10.0
"""Seconds between two warnings about events left out because they cannot be encoded."""


class Outcome(enum.Enum):
    ACCEPTED = "accepted"  # in a buffer: safe to acknowledge (a Commit instead: once written)
    UNMATCHED = "unmatched"  # no route: counted and warned about, acknowledged as Fluentd does


Answer = Outcome | Commit | Wait | Refused
"""What dispatch says of a message: accepted (now, or once a Commit settles), unmatched, wait
(then offer it again), or refused (do not acknowledge; the reason is counted)."""

TAG_TOO_LONG = Refused("tag_too_long")


@dataclass(slots=True)
class Destination:
    name: str
    formatter: Formatter
    flusher: Flusher
    shares: Shares
    taken: metrics.Tally = field(init=False)
    """Events appended to its buffer (aggregator_buffer_events_total)."""

    def __post_init__(self) -> None:
        self.taken = metrics.tally(metrics.BUFFER_EVENTS.labels(self.name))


@dataclass(frozen=True, slots=True)
class Ticket:
    """Where one tag's events go, whose they are, and the filters they go through first."""

    dest: Destination
    tenant: Tenant
    filters: FilterChain | None


@dataclass(slots=True, eq=False)
class _HandedChunk:
    """A chunk being handed off: finished in its store once every piece is acknowledged."""

    dest: Destination
    chunk: Chunk
    unfinished: set[_HandedChunk]
    """Where it is while it is not finished (then it goes, and its lines with it)."""
    pieces: list[tuple[list[bytes], Parcel]] = field(default_factory=list)
    all_sent: bool = False
    finished: bool = False

    def acked(self, events: int) -> None:
        metrics.HANDOFF_EVENTS.labels(self.dest.name).inc(events)
        self.dest.flusher.handed_off += events
        self.finish_if_done()

    def finish_if_done(self) -> None:
        if self.all_sent and not self.finished:
            acked = sum(len(piece) for piece, parcel in self.pieces if parcel.acked)
            if acked == len(self.chunk.lines):
                self.finished = True
                self.unfinished.discard(self)
                self.dest.flusher.store.finish(self.chunk)


class Pipeline:
    def __init__(self, config: Config, worker: int = 0, workers: int = 1) -> None:
        self.config = config
        self.admission = Admission(config.limits, workers)
        self.filters = Filters(config)
        self._concat_timer: asyncio.Task[None] | None = None
        self.destinations: dict[str, Destination] = {}
        # Secondaries first, so that a primary's buffer can hand over to a built one.
        order = sorted(config.destinations.items(), key=lambda kv: kv[1].secondary is not None)
        for name, settings in order:
            secondary = (
                self.destinations[settings.secondary].flusher if settings.secondary else None
            )
            store = build_store(name, settings.buffer, worker, workers)
            sink = build_sink(name, settings, worker)
            flusher = Flusher(name, settings.buffer, store, sink, secondary)
            shares = Shares(flusher, self.admission.tenants)
            self.destinations[name] = Destination(name, build_formatter(settings), flusher,
                                                  shares)  # fmt: skip
        # One router per label (Fluentd's <label>): a source sees only its label's routes.
        self._tickets: dict[str | None, TagCache[Ticket | Refused | None]] = {}
        for label in {None, *(route.label for route in config.routes)}:
            router = Router([(route.match, self.destinations[route.destination])
                             for route in config.routes if route.label == label])  # fmt: skip
            self._tickets[label] = TagCache(partial(self._ticket, router, label))
        self._unmatched_warning = Throttle(UNMATCHED_WARNING_INTERVAL)
        self._invalid_warning = Throttle(INVALID_WARNING_INTERVAL)

    async def start(self) -> None:
        for dest in self.destinations.values():
            await dest.flusher.store.start()
            await dest.flusher.sink.start()
            dest.flusher.start()
        if self.filters.concats:
            self._concat_timer = asyncio.get_running_loop().create_task(self._let_go_expired())

    def _ticket(
        self, router: Router[Destination], label: str | None, tag: str
    ) -> Ticket | Refused | None:
        tenants = self.admission.tenants
        if len(tag) > tenants.tag_length_limit:
            return TAG_TOO_LONG  # before naming a tenant from it: it may be a megabyte
        tenant = tenants.of(tag)
        if len(tag) > tenant.tag_length_limit:
            return TAG_TOO_LONG
        dest = router.route(tag)
        if dest is None:
            return None
        return Ticket(dest, tenant, self.filters.chain(label, tag) if self.filters else None)

    def route(self, tag: str, label: str | None = None) -> Destination | None:
        """Where ``tag`` goes from a source with ``label``: the first matching route's."""
        ticket = self._tickets[label](tag)
        return ticket.dest if isinstance(ticket, Ticket) else None

    def dispatch(
        self, tag: str, entries: Sequence[Any], source: str, *, label: str | None = None,
        strict: bool = False, sender: Sender | None = None, acks: bool = False,
    ) -> Answer:  # fmt: skip
        """Route and buffer one message from ``source`` (whose routes are ``label``'s). An entry
        that cannot be encoded is left out, counted and warned about, and the rest is buffered;
        with ``strict``, it raises formatting.InvalidEvent instead, and nothing of the message
        is buffered. ``sender``: the connection, which a tenant's limits may make wait when it
        carries that tenant alone and no ``acks`` are asked (else they refuse)."""
        ticket = self._tickets[label](tag)  # route(), inlined: once per read
        if ticket is None:
            self._unmatched(tag, len(entries))
            return Outcome.UNMATCHED
        if type(ticket) is Refused:
            self.admission.refused(None, source, ticket.reason, len(entries))
            return ticket
        assert type(ticket) is Ticket
        tenant, dest = ticket.tenant, ticket.dest
        can_wait = False
        if sender is not None:
            sender.carries(tenant)
            can_wait = not acks and not sender.mixed
        verdict = self.admission.check(tenant, dest.flusher, dest.shares, can_wait=can_wait)
        if verdict is not None:
            if type(verdict) is Refused:
                self._refused(dest, tenant, source, verdict.reason, len(entries))
            return verdict
        if ticket.filters is not None:
            entries = ticket.filters.run(tag, list(entries))
            if not entries:
                return Outcome.ACCEPTED  # filtered away (or held by concat): taken
        return self._take(ticket, tag, entries, source, strict)

    def _take(
        self, ticket: Ticket, tag: str, entries: Sequence[Any], source: str, strict: bool
    ) -> Outcome | Commit:
        """Admitted events: formatted, fitted to the tenant's max_event_size, charged to it,
        appended to the buffer."""
        tenant, dest = ticket.tenant, ticket.dest
        encoded = dest.formatter.encode(tag, entries, strict=strict)
        if encoded.invalid:
            self._invalid(source, tag, encoded.invalid, encoded.error)
        lines, nbytes = encoded.lines, encoded.nbytes
        if lines and tenant.limits.max_event_size is not None:
            lines, nbytes = self.admission.fit(tenant, source, lines, nbytes)
        if lines:
            self.admission.charge(tenant, dest.shares, nbytes, len(lines))
            commit = dest.flusher.store.append(tag, lines, nbytes)
            dest.taken.pending += len(lines)
            if commit is not None:
                return commit
        return Outcome.ACCEPTED

    async def _let_go_expired(self) -> None:
        while True:
            await asyncio.sleep(CONCAT_CHECK_INTERVAL)
            self.let_go(drain=False)

    def let_go(self, drain: bool) -> None:
        """Events concat filters let go (expired, past their limits; every one held when
        ``drain``, at the stop): through the filters after them, into their buffers. They were
        admitted when their parts came: they are not refused now."""
        for concat in self.filters.concats:
            for tag, entry in concat.drain() if drain else concat.expired():
                label = concat.settings.timeout_label or self.filters.label_of(concat)
                ticket = self._tickets[label](tag)
                if not isinstance(ticket, Ticket):
                    self._unmatched(tag, 1)
                    continue
                after = None if concat.settings.timeout_label else concat
                entries = ticket.filters.run(tag, [entry], after) if ticket.filters else [entry]
                if entries:
                    self._take(ticket, tag, entries, concat.name, strict=False)

    async def offer(
        self, wait: Wait, tag: str, entries: Sequence[Any], source: str, **options: Any
    ) -> Outcome | Commit | Refused:
        """After ``wait``: wait, then offer the same message again, until the answer is not to
        wait (``options``: dispatch's)."""
        answer: Answer = wait
        while isinstance(answer, Wait):
            await answer.ready()
            answer = self.dispatch(tag, entries, source, **options)
        return answer

    def _refused(
        self, dest: Destination, tenant: Tenant, source: str, reason: str, events: int
    ) -> None:
        if reason == "buffer_full":  # the buffer's own limit (throw_exception), as before
            metrics.DROPPED_EVENTS.labels(dest.name, reason).inc(events)
        else:
            self.admission.refused(tenant, source, reason, events)

    def flush_all(self) -> None:
        for dest in self.destinations.values():
            dest.flusher.flush_now()

    def abandon(self, tag: str, events: int, reason: str, label: str | None = None) -> None:
        """Count events a source took from a client but could not hand to a buffer."""
        dest = self.route(tag, label)
        name = dest.name if dest is not None else "none"
        metrics.DROPPED_EVENTS.labels(name, reason).inc(events)
        if dest is not None:
            dest.flusher.dropped += events

    @property
    def has_secondary(self) -> bool:
        return any(d.secondary for d in self.config.destinations.values())

    async def close(self, plan: StopPlan, handoff: Peer | None = None) -> list[str]:
        """Flush every buffer until ``plan.flush_until``; hand what is left to ``handoff`` until
        ``plan.handoff_until``; then to the secondaries, which write until ``plan.end``, except
        what file buffers keep on disk. Returns what they kept, one line each."""
        if self._concat_timer is not None:
            self._concat_timer.cancel()
        self.let_go(drain=True)  # what concat filters hold goes to the buffers, to be delivered
        secondaries = {d.secondary for d in self.config.destinations.values() if d.secondary}
        primaries = [d for n, d in self.destinations.items() if n not in secondaries]
        await asyncio.gather(*(dest.flusher.close(plan.flush_until) for dest in primaries))
        if handoff is not None:
            await self._hand_off(handoff, primaries, plan.handoff_until)
        kept = [await dest.flusher.release() for dest in primaries]
        last = [self.destinations[n].flusher for n in secondaries]
        await asyncio.gather(*(flusher.close(plan.end) for flusher in last))
        kept += [await flusher.release() for flusher in last]
        return [line for line in kept if line]

    async def _hand_off(self, peer: Peer, primaries: list[Destination], until: float) -> None:
        """Hand off what the primaries' stores hold, chunk by chunk as acks come back; a chunk
        not wholly acknowledged in time goes back to its store with what is left of it."""
        unfinished: set[_HandedChunk] = set()
        parcels = self._parcels(primaries, unfinished)
        try:
            await hand_off(peer, parcels, until)
        finally:
            parcels.close()
        for handed in unfinished:
            acked = {id(line) for piece, parcel in handed.pieces if parcel.acked
                     for line in piece}  # fmt: skip
            chunk = handed.chunk
            chunk.keep([line for line in chunk.lines if id(line) not in acked])
            handed.dest.flusher.store.requeue(chunk)

    def _parcels(
        self, primaries: list[Destination], unfinished: set[_HandedChunk]
    ) -> Generator[Parcel, None, None]:
        for dest in primaries:
            store = dest.flusher.store
            while (chunk := store.take()) is not None:
                handed = _HandedChunk(dest, chunk, unfinished)
                unfinished.add(handed)
                for tag, lines in tagged(chunk, chunk.lines):
                    for i in range(0, len(lines), MESSAGE_EVENTS):
                        piece = lines[i : i + MESSAGE_EVENTS]
                        entries = [dest.formatter.entry_of(line) for line in piece]
                        parcel = Parcel.of(tag, entries, partial(handed.acked, len(piece)))
                        handed.pieces.append((piece, parcel))
                        yield parcel
                handed.all_sent = True
                handed.finish_if_done()

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
