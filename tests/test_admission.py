"""Admission: the buffer's room and overflow_action, tenants named from tags, their rate (a
token bucket on a scripted clock), buffer shares, tags too long and events too large. Real
flushers and stores; only the sink is scripted."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from aggregator.admission import TRUNCATED_MARK, Admission, Refused, Shares, Wait
from aggregator.config.model import Limits
from tests.test_flusher import ScriptedSink, append, lines, run, settings, started, stop


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admission(clock: Clock | None = None, **limits: Any) -> Admission:
    return Admission(Limits(**limits), clock=clock or Clock())


# --- the buffer's room ---------------------------------------------------------------------


def test_a_full_buffer_that_blocks_says_wait_until_there_is_room() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        sink.gate.clear()  # the destination stalls
        buf = await started("t", settings(chunk_limit_size=100, total_limit_size=200), sink)
        gate = admission()
        tenant, shares = gate.tenants.of("t"), Shares(buf, gate.tenants)
        append(buf, lines(10), 100)
        append(buf, lines(10, 10), 100)
        answer = gate.check(tenant, buf, shares, can_wait=False)  # a full buffer: even with acks
        assert isinstance(answer, Wait)
        waiter = asyncio.ensure_future(answer.ready())
        await asyncio.sleep(0.1)
        assert not waiter.done()
        sink.gate.set()  # the destination resumes
        await asyncio.wait_for(waiter, 2)
        assert gate.check(tenant, buf, shares, can_wait=False) is None
        await stop(buf, time.monotonic() + 2)
        assert len(sink.delivered) == 20

    run(main)


def test_throw_exception_refuses_when_full() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        sink.gate.clear()
        s = settings(chunk_limit_size=100, total_limit_size=100, overflow_action="throw_exception")
        buf = await started("t", s, sink)
        gate = admission()
        append(buf, lines(10), 100)
        answer = gate.check(gate.tenants.of("t"), buf, Shares(buf, gate.tenants), can_wait=True)
        assert answer == Refused("buffer_full", 1.0)
        sink.gate.set()
        await stop(buf, time.monotonic() + 2)

    run(main)


def test_drop_oldest_chunk_makes_room_and_counts(store: str) -> None:
    async def main() -> None:
        sink = ScriptedSink()
        sink.gate.clear()
        # A file buffer counts its segments' bytes (and each has an 8-byte header, each frame a
        # header of its own): its limit here is set so that two chunks fill it.
        limit = 200 if store == "memory" else 250
        s = settings(store, chunk_limit_size=100, total_limit_size=limit, flush_thread_count=1,
                     overflow_action="drop_oldest_chunk")  # fmt: skip
        buf = await started("t", s, sink)
        gate = admission()
        append(buf, lines(10), 100)  # in flight, stuck
        await asyncio.sleep(0.05)
        append(buf, lines(10, 10), 100)  # queued
        buf.flush_now()
        assert not buf.store.has_room()
        shares = Shares(buf, gate.tenants)
        assert gate.check(gate.tenants.of("t"), buf, shares, can_wait=False) is None
        assert buf.dropped == 10  # the queued chunk
        append(buf, lines(10, 20), 100)
        sink.gate.set()
        await stop(buf, time.monotonic() + 2)
        assert sorted(sink.delivered) == lines(10) + lines(10, 20)

    run(main)


# --- tenants ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant_from", "tag", "name"),
    [
        ({}, "payments.api.web", "payments"),
        ({"part": -1}, "payments.api.web", "web"),
        ({"part": 5}, "payments.api", "other"),
        ({"regex": r"^k8s\.(?P<tenant>[^.]+)\."}, "k8s.search.pod-1", "search"),
        ({"regex": r"^docker\.([a-z]+)"}, "docker.billing7.x", "billing"),
        ({"regex": r"^docker\.([a-z]+)"}, "other.billing", "other"),
    ],
)
def test_a_tag_names_its_tenant(tenant_from: dict[str, Any], tag: str, name: str) -> None:
    assert admission(tenant_from=tenant_from).tenants.of(tag).name == name


def test_overrides_change_only_the_keys_they_give_and_name_the_metrics_label() -> None:
    gate = admission(rate="1MiB/s", buffer_share=0.5,
                     overrides={"payments": {"rate": "8MiB/s"}})  # fmt: skip
    payments, search = gate.tenants.of("payments.api"), gate.tenants.of("search.web")
    assert (payments.limits.rate, payments.limits.buffer_share) == (8 * 2**20, 0.5)
    assert (search.limits.rate, search.limits.buffer_share) == (2**20, 0.5)
    assert (payments.label, search.label) == ("payments", "other")
    assert gate.tenants.of("payments.db") is payments  # one tenant, one bucket


# --- rate ----------------------------------------------------------------------------------


def test_the_token_bucket_lets_a_burst_through_then_the_rate() -> None:
    clock = Clock()
    gate = admission(clock, rate=1000, burst=3000)
    tenant = gate.tenants.of("a.b")
    for _ in range(3):  # the burst
        assert tenant.rate_wait() == 0
        tenant.charge(1000)
    assert tenant.rate_wait() == pytest.approx(0.001)  # paid back as it comes
    clock.now += 0.5
    assert tenant.rate_wait() == 0
    tenant.charge(1000)
    assert tenant.rate_wait() == pytest.approx(0.501)
    clock.now += 60  # an idle minute earns no more than the burst
    tenant.charge(3000)
    assert tenant.rate_wait() > 0


def test_each_worker_holds_its_share_of_the_rate() -> None:
    gate = Admission(Limits(rate="8MiB/s", instances=2), workers=4, clock=Clock())
    tenant = gate.tenants.of("t")
    assert tenant.rate == 2**20 and tenant.burst == 2**20  # 8 MiB/s over 2 x 4; burst: 1 s


def test_over_its_rate_a_tenant_waits_when_it_can_else_is_refused_with_retry_after() -> None:
    async def main() -> None:
        clock = Clock()
        buf = await started("t", settings(), ScriptedSink())
        gate = admission(clock, rate=100, burst=100)
        tenant, shares = gate.tenants.of("t"), Shares(buf, gate.tenants)
        gate.charge(tenant, shares, 300, 3)
        assert isinstance(gate.check(tenant, buf, shares, can_wait=True), Wait)
        refused = gate.check(tenant, buf, shares, can_wait=False)
        assert isinstance(refused, Refused) and refused.reason == "rate_limited"
        assert refused.retry_after == pytest.approx(2.001)
        clock.now += 2.5
        assert gate.check(tenant, buf, shares, can_wait=False) is None
        await stop(buf, time.monotonic() + 1)

    run(main)


# --- buffer shares ------------------------------------------------------------------------


def test_a_tenant_at_its_share_waits_or_is_refused_while_others_go_on(store: str) -> None:
    async def main() -> None:
        sink = ScriptedSink()
        sink.gate.clear()
        s = settings(store, total_limit_size=5000, chunk_limit_size=100, flush_thread_count=1)
        buf = await started("t", s, sink)
        cost = buf.store.cost(100, 10)  # a chunk, as this store counts it
        gate = admission(buffer_share=3 * cost / 5000)  # three chunks
        shares = Shares(buf, gate.tenants)
        noisy, quiet = gate.tenants.of("noisy.x"), gate.tenants.of("quiet.x")
        for i in range(0, 40, 10):  # the first chunk is taken (in flight): three wait queued
            gate.charge(noisy, shares, 100, 10)
            append(buf, lines(10, i), 100, "noisy.x")
            buf.flush_now()
            await asyncio.sleep(0.02)
        assert shares.held == {"noisy": 3 * cost}  # what waits in the store
        answer = gate.check(noisy, buf, shares, can_wait=True)
        assert isinstance(answer, Wait)
        assert gate.check(noisy, buf, shares, can_wait=False) == Refused("buffer_share", 1.0)
        assert gate.check(quiet, buf, shares, can_wait=False) is None  # the others go on
        waiting = asyncio.ensure_future(answer.ready())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        sink.gate.set()  # deliveries take chunks from the store: the share comes back
        await asyncio.wait_for(waiting, 2)
        await stop(buf, time.monotonic() + 2)
        assert shares.held == {}

    run(main)


# --- tags and events --------------------------------------------------------------------------


def test_a_tag_too_long_for_every_tenant_is_not_even_named() -> None:
    gate = admission(tag_length_limit=100, overrides={"long": {"tag_length_limit": 200}})
    assert gate.tenants.tag_length_limit == 200
    assert gate.tenants.of("long." + "x" * 150).tag_length_limit == 200
    assert gate.tenants.of("short." + "x" * 150).tag_length_limit == 100


def test_events_over_max_event_size_are_cut_or_refused_and_counted() -> None:
    big = orjson.dumps({"log": "é" * 400, "n": 1}, option=orjson.OPT_APPEND_NEWLINE)
    small = b'{"log":"ok"}\n'
    cut = admission(max_event_size=200)
    tenant = cut.tenants.of("t")
    kept, nbytes = cut.fit(tenant, "forward", [small, big, small], len(big) + 2 * len(small))
    assert len(kept) == 3 and kept[0] == kept[2] == small and len(kept[1]) <= 200
    record = orjson.loads(kept[1])
    assert record["n"] == 1 and record["log"].endswith(TRUNCATED_MARK)
    assert nbytes == sum(map(len, kept))
    refuse = admission(max_event_size=200, max_event_size_action="refuse")
    assert refuse.fit(refuse.tenants.of("t"), "forward", [small, big], 0) == (
        [small], len(small))  # fmt: skip
    no_strings = b'{"n":[' + b"1," * 200 + b"1]}\n"
    assert cut.fit(tenant, "forward", [no_strings], len(no_strings)) == ([], 0)
