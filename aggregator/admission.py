"""Whether events may go into a destination's buffer now: the one answer for every source.

The pipeline asks :meth:`Admission.check` for each message (one tag, one destination) before it
formats it. The answer is None (go ahead), a :class:`Wait` (not now: await it, then offer the same
events again) or :class:`Refused` (with the reason, counted here). Two kinds of limits are
checked, in this order:

- The tenant's (``[limits]``, Loki's ideas): a tag too long; its rate (a token bucket of bytes
  per second, each worker allowing its share); its share of the destination's buffer. A sender
  that can wait (no acks, and its connection carries this tenant alone) is made to wait, so
  that TCP slows it down; one that cannot (acks, a connection carrying several tenants, HTTP) is
  refused: no ack, or 429, and the client sends again later. Other tenants go on meanwhile.
- The buffer's: full, then ``overflow_action`` (block: wait; drop_oldest_chunk: make room;
  throw_exception: refused).

What a message costs is known once it is formatted: :meth:`Admission.charge` takes it from the
tenant's bucket (which may go below zero: the next message waits for it) and adds it to its
share, which the destination's store gives back as chunks leave it. :meth:`Admission.fit`
applies ``max_event_size`` to the formatted lines.

Tenants come from tags, which senders choose: the limits keep one misbehaving service from
hurting the others, not a hostile sender that invents tenants (``security`` is for that).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

from aggregator import metrics
from aggregator.config.model import Limits, TenantLimits
from aggregator.flusher import Flusher
from aggregator.logs import Throttle
from aggregator.routing import TagCache
from aggregator.stores import Runs

log = logging.getLogger(__name__)

DEFAULT_TAG_LENGTH_LIMIT = 1024
MAX_TENANTS = 10_000
"""Tenants remembered with their buckets; past this they are all forgotten and start again
(only a sender inventing tenants gets there)."""
OTHER = "other"
"""The metrics' tenant label of every tenant not named in overrides, and the tenant of tags
that tenant_from's regex does not match."""
TRUNCATED_MARK = "…[truncated]"
LIMIT_WARNING_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str
    retry_after: float = 0.0
    """Seconds after which the same may be accepted (HTTP's Retry-After); 0: not known."""


class Wait:
    """Not now: await :meth:`ready`, then offer the same events again."""

    __slots__ = ("ready",)

    def __init__(self, ready: Callable[[], Awaitable[None]]) -> None:
        self.ready = ready


class Sender:
    """What admission knows of one connection: whether it carries one tenant alone (then it
    may be made to wait for that tenant's limits without delaying anyone else)."""

    __slots__ = ("mixed", "tenant")

    def __init__(self) -> None:
        self.tenant: Tenant | None = None
        self.mixed = False

    def carries(self, tenant: Tenant) -> None:
        if self.tenant is None:
            self.tenant = tenant
        elif self.tenant is not tenant:
            self.mixed = True


class Tenant:
    """One tenant in this worker: its limits, its token bucket, its metrics' label."""

    __slots__ = ("_clock", "burst", "label", "limits", "m_bytes", "name", "rate", "share",
                 "tag_length_limit", "tokens", "unlimited", "updated")  # fmt: skip

    def __init__(
        self, name: str, label: str, limits: TenantLimits, share: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._clock = clock
        self.name = name
        self.label = label
        self.limits = limits
        self.tag_length_limit = limits.tag_length_limit or DEFAULT_TAG_LENGTH_LIMIT
        self.m_bytes = metrics.tally(metrics.TENANT_BYTES.labels(label))
        self.rate = None if limits.rate is None else limits.rate * share
        burst = limits.burst if limits.burst is not None else limits.rate
        self.burst = None if burst is None else burst * share
        self.tokens = math.inf if self.burst is None or self.rate is None else self.burst
        """Bytes it may send now (without a rate, always: one look per message)."""
        self.updated = clock()
        self.share = limits.buffer_share
        self.unlimited = self.rate is None and self.share is None and limits.max_event_size is None
        """No rate, share or size to keep: only its bytes are counted (the per-read fast path)."""

    def rate_wait(self) -> float:
        """0 when the tenant may send now, else the seconds until it may."""
        if self.tokens > 0:
            return 0.0
        self._refill()
        assert self.rate is not None
        return 0.0 if self.tokens > 0 else -self.tokens / self.rate + 0.001

    def charge(self, nbytes: int) -> None:
        """Take what a message cost from the bucket (it may go below zero: the next message
        waits until it is paid back)."""
        self.m_bytes.pending += nbytes
        if self.rate is not None:
            self._refill()
            self.tokens -= nbytes

    def _refill(self) -> None:
        # At every charge, not only when empty: a bucket refilled late would count as earned
        # the time it spent full.
        rate, burst = self.rate, self.burst
        assert rate is not None and burst is not None
        now = self._clock()
        self.tokens = min(burst, self.tokens + (now - self.updated) * rate)
        self.updated = now


class Tenants:
    """Tenants by tag: named once per tag (remembered), with their limits."""

    def __init__(
        self, limits: Limits, share: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limits = limits
        self._share = share
        self._clock = clock
        source = limits.tenant_from
        self._regex = re.compile(source.regex) if source.regex is not None else None
        self._part = source.part
        self._by_name: dict[str, Tenant] = {}
        self.of: TagCache[Tenant] = TagCache(self._tenant)
        """The tenant of a tag."""
        tag_limits = [limits.of(name).tag_length_limit for name in limits.overrides]
        self.tag_length_limit = max(
            [limit or DEFAULT_TAG_LENGTH_LIMIT for limit in [limits.tag_length_limit, *tag_limits]]
        )
        """The longest tag any tenant may have: longer ones are refused before being named."""

    def name_of(self, tag: str) -> str:
        if self._regex is not None:
            m = self._regex.search(tag)
            if m is None:
                return OTHER
            if "tenant" in m.groupdict():
                return m.group("tenant") or OTHER
            return (m.group(1) if m.groups() else m.group(0)) or OTHER
        parts = tag.split(".")
        assert self._part is not None
        try:
            return parts[self._part] or OTHER
        except IndexError:
            return OTHER

    def _tenant(self, tag: str) -> Tenant:
        name = self.name_of(tag)
        tenant = self._by_name.get(name)
        if tenant is None:
            if len(self._by_name) >= MAX_TENANTS:
                self._by_name.clear()
                self.of.clear()
            label = name if name in self._limits.overrides else OTHER
            tenant = Tenant(name, label, self._limits.of(name), self._share, self._clock)
            self._by_name[name] = tenant
        return tenant


class Shares:
    """What each tenant holds of one destination's buffer, against buffer_share: counted as the
    store counts (memory with its bookkeeping, or disk) from when its events go in until their
    chunk leaves the store; the chunks in delivery attempts (2 x flush_thread_count at most)
    are no one's."""

    def __init__(self, flusher: Flusher, tenants: Tenants) -> None:
        self._total = flusher.settings.total_limit_size
        self._tenants = tenants
        self._cost = flusher.store.cost
        self.held: dict[str, int] = {}
        self._released = asyncio.Event()
        flusher.store.on_left = self.release

    def over(self, tenant: Tenant) -> bool:
        share = tenant.share
        return share is not None and self.held.get(tenant.name, 0) >= share * self._total

    def charge(self, tenant: Tenant, nbytes: int, events: int) -> None:
        """``tenant`` now holds ``events`` more events of ``nbytes`` in the store (when it has a
        share to keep)."""
        if tenant.share is not None:
            held = self.held
            held[tenant.name] = held.get(tenant.name, 0) + self._cost(nbytes, events)

    def release(self, runs: Runs) -> None:
        """Events left the store (taken for delivery, dropped, never written): their runs go
        from the shares. (One read back after a restart gives back what this process never
        counted: nothing goes below zero.)"""
        held = self.held
        if not held:
            return
        for tag, events, nbytes in runs:
            name = self._tenants.of(tag).name
            if name in held:
                left = held[name] - self._cost(nbytes, events)
                if left > 0:
                    held[name] = left
                else:
                    del held[name]
        self._released.set()

    async def wait(self, tenant: Tenant) -> None:
        while self.over(tenant):
            self._released.clear()
            await self._released.wait()


class Admission:
    """The limits of one worker's pipeline."""

    def __init__(
        self, limits: Limits, workers: int = 1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tenants = Tenants(limits, 1.0 / (limits.instances * workers), clock)
        self._warning = Throttle(LIMIT_WARNING_INTERVAL)

    def check(
        self, tenant: Tenant, flusher: Flusher, shares: Shares, *, can_wait: bool
    ) -> Wait | Refused | None:
        """May ``tenant`` add to ``flusher``'s buffer now? ``can_wait``: the sender may be made
        to wait for the tenant's limits (no acks, a connection of its own)."""
        if not tenant.unlimited:
            if tenant.tokens <= 0 and (delay := tenant.rate_wait()) > 0:
                if can_wait:
                    return Wait(lambda: asyncio.sleep(delay))
                return Refused("rate_limited", delay)
            if tenant.share is not None and shares.over(tenant):
                if can_wait:
                    return Wait(lambda: shares.wait(tenant))
                return Refused("buffer_share", 1.0)
        return None if flusher.store.has_room() else self._room(flusher)

    def _room(self, flusher: Flusher) -> Wait | Refused | None:
        """The buffer's own limit, full: ``overflow_action``."""
        store = flusher.store
        flusher.publish_state()  # health reads the fill ratio: let it see "full" at once
        action = flusher.settings.overflow_action
        if action == "block":
            return Wait(flusher.wait_for_room)
        if action == "drop_oldest_chunk" and (events := store.drop_oldest()) is not None:
            log.warning("buffer full: dropped the oldest chunk",
                        extra={"destination": flusher.name, "events": events})  # fmt: skip
            flusher.count_dropped(events, "buffer_overflow")
            return None
        return Refused("buffer_full", 1.0)

    def charge(self, tenant: Tenant, shares: Shares, nbytes: int, events: int) -> None:
        """What a message cost once formatted: from the bucket, into the share (as the store
        counts it; the store gives it back as the events leave it)."""
        tenant.charge(nbytes)
        if tenant.share is not None:
            shares.charge(tenant, nbytes, events)

    def refused(self, tenant: Tenant | None, source: str, reason: str, events: int) -> None:
        """Count what a limit refused or cut (never silently); ``tenant`` None: not named (a
        tag too long)."""
        label = OTHER if tenant is None else tenant.label
        metrics.LIMITED_EVENTS.labels(source, label, reason).inc(events)
        if due := self._warning.hit(events):
            log.warning(
                "events refused by a limit",
                extra={"source": source, "tenant": None if tenant is None else tenant.name[:100],
                       "reason": reason, "events_since_last_line": due},
            )  # fmt: skip

    def fit(
        self, tenant: Tenant, source: str, lines: list[bytes], nbytes: int
    ) -> tuple[list[bytes], int]:
        """``lines`` within the tenant's max_event_size: longer ones cut or left out."""
        limit = tenant.limits.max_event_size
        if limit is None or max(map(len, lines)) <= limit:
            return lines, nbytes
        truncate = tenant.limits.max_event_size_action != "refuse"
        kept: list[bytes] = []
        cut = refused = 0
        for line in lines:
            if len(line) > limit:
                shorter = _truncated(line, limit) if truncate else None
                if shorter is None:
                    refused += 1
                    continue
                cut += 1
                line = shorter
            kept.append(line)
        if cut:
            self.refused(tenant, source, "event_truncated", cut)
        if refused:
            self.refused(tenant, source, "event_too_large", refused)
        return kept, sum(map(len, kept))


def _truncated(line: bytes, limit: int) -> bytes | None:
    """``line`` (a JSON object) within ``limit`` bytes by shortening its longest string value;
    None when that cannot do it."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    for _ in range(3):
        key = max((k for k, v in record.items() if isinstance(v, str)),
                  key=lambda k: len(record[k]), default=None)  # fmt: skip
        if key is None:
            return None
        excess = len(line) - limit
        value: str = record[key]
        keep = len(value.encode()) - excess - len(TRUNCATED_MARK.encode()) - 8
        if keep < 0:
            return None
        record[key] = value.encode()[:keep].decode("utf-8", "ignore") + TRUNCATED_MARK
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        if len(line) <= limit:
            return line
    return None
