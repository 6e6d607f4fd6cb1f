"""Tenants and their limits as users meet them: real processes, real sockets, the emulator.

A noisy service floods while a quiet one goes on; a tenant over its rate is slowed down (no
acks, a connection of its own) or refused (acks, a shared connection, HTTP); a tag too long is
refused without closing the connection."""

from __future__ import annotations

import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgpack
import orjson
import pytest

from aggregator.protocol import encode_message, encode_packed_forward, new_chunk_id
from emulator import EmulatorThread
from tests.integration.conftest import Aggregator, StartAggregator, wait_for
from tests.integration.test_stopping import instance_config


def limits_config(endpoint: str, limits: str, **settings: Any) -> str:
    return instance_config(endpoint, max_connection_age=None, secondary=None,
                           **{"flush_interval": "200ms", **settings}) + limits  # fmt: skip


class AckedSender(threading.Thread):
    """PackedForward messages with acks on one connection, as out_forward sends them: one
    without an ack within ``ack_timeout`` is sent again (same chunk id). Records each
    message's time to its ack."""

    def __init__(self, port: int, tag: str, events: int, interval: float = 0.0,
                 ack_timeout: float = 1.0, pad: int = 300) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.port, self.tag, self.events, self.interval = port, tag, events, interval
        self.ack_timeout = ack_timeout
        self.pad = "x" * pad
        self.acked: list[int] = []
        self.latencies: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            unpacker = msgpack.Unpacker(raw=False)
            first = 0
            while not self.stopping.is_set():
                ids = range(first, first + self.events)
                entries = [[int(time.time()), {"id": i, "tag": self.tag, "pad": self.pad}]
                           for i in ids]  # fmt: skip
                chunk = new_chunk_id()
                message = encode_packed_forward(self.tag, entries, chunk=chunk)
                started = time.monotonic()
                while not self.stopping.is_set():
                    sock.sendall(message)
                    if self._acked(sock, unpacker, chunk):
                        self.latencies.append(time.monotonic() - started)
                        self.acked += ids
                        break
                first += self.events
                time.sleep(self.interval)

    def _acked(self, sock: socket.socket, unpacker: msgpack.Unpacker, chunk: str) -> bool:
        deadline = time.monotonic() + self.ack_timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(4096)
            except TimeoutError:
                return False
            if not data:
                raise ConnectionResetError("closed")
            unpacker.feed(data)
            if any(reply.get("ack") == chunk for reply in unpacker):
                return True
        return False


@pytest.fixture
def senders() -> Iterator[list[AckedSender]]:
    made: list[AckedSender] = []
    yield made
    for sender in made:
        sender.stopping.set()


def delivered_ids(emulator: EmulatorThread, tag: str) -> Counter[int]:
    events = (orjson.loads(line) for line in emulator.lines("logs"))
    return Counter(e["id"] for e in events if e.get("tag") == tag)


def test_a_flooding_tenant_fills_its_share_while_a_quiet_one_goes_on(
    emulator: EmulatorThread, start_aggregator: StartAggregator, senders: list[AckedSender]
) -> None:
    """Firehose down; a noisy service floods with acks over 4 connections, a quiet one sends
    an acked message every 50 ms: the quiet one's acks stay prompt and nothing is lost; the
    noisy one is refused past half the buffer and sends again."""
    emulator.configure(throttle_rate=1.0)
    agg = start_aggregator(limits_config(
        emulator.endpoint_url, "\n[limits]\nbuffer_share = 0.5\n",
        total_limit_size="8MiB", chunk_limit_size="64KiB",
    ))  # fmt: skip
    senders += [AckedSender(agg.forward_port, "noisy.api", 500) for _ in range(4)]
    quiet = AckedSender(agg.forward_port, "quiet.web", 1, interval=0.05)
    senders.append(quiet)
    for sender in senders:
        sender.start()
    assert wait_for(lambda: agg.metric("aggregator_limited_events_total",
                                       reason="buffer_share") > 0, 30)  # fmt: skip
    time.sleep(5)  # the flood goes on against its share
    acked_before = len(quiet.latencies)
    time.sleep(3)
    assert len(quiet.latencies) > acked_before + 30, "the quiet tenant stopped getting acks"
    p99 = statistics.quantiles(quiet.latencies, n=100)[98]
    assert p99 < 1.0, f"quiet tenant's p99 ack latency {p99:.2f} s"
    fill = agg.metric("aggregator_buffer_fill_ratio")
    assert 0.4 < fill < 0.9, f"the buffer is {fill:.0%} full: the share did not hold"
    emulator.configure(throttle_rate=0.0)  # the outage ends
    for sender in senders:
        sender.stopping.set()
    for sender in senders:
        sender.join(10)
    noisy_acked = {i for s in senders[:4] for i in s.acked}
    assert wait_for(lambda: set(quiet.acked) <= set(delivered_ids(emulator, "quiet.web")), 30)
    assert wait_for(
        lambda: len(delivered_ids(emulator, "noisy.api")) >= len(noisy_acked) > 0, 30
    )
    assert agg.stop() == 0


def flood(port: int, tag: str, seconds: float, event_size: int) -> None:
    """Message mode without acks, as fast as the socket takes it (Docker's driver's shape)."""
    record = {"log": "x" * (event_size - len(f'{{"log":"","tag":"{tag}"}}\n'))}
    message = encode_message(tag, time.time(), record) * 200
    ends = time.monotonic() + seconds
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < ends:
            try:
                sock.sendall(message)
            except TimeoutError:
                continue


def test_a_tenant_over_its_rate_is_slowed_down_to_it_and_another_is_untouched(
    emulator: EmulatorThread, start_aggregator: StartAggregator, senders: list[AckedSender]
) -> None:
    """rate 1 MiB/s, burst 2 MiB: flat out for 12 s, about 14 MiB get through; a quiet tenant
    alongside keeps its prompt acks."""
    agg = start_aggregator(limits_config(emulator.endpoint_url, """
[limits.overrides.flood]
rate = "1MiB/s"
burst = "2MiB"
""", workers=1))  # fmt: skip
    quiet = AckedSender(agg.forward_port, "quiet.web", 10, interval=0.05)
    senders.append(quiet)
    quiet.start()
    started = time.monotonic()
    flood(agg.forward_port, "flood.app", 12.0, event_size=1000)
    took = agg.metric("aggregator_tenant_bytes_total", tenant="flood")
    elapsed = time.monotonic() - started
    expected = 2 * 2**20 + elapsed * 2**20
    print(f"{took / 2**20:.1f} MiB in {elapsed:.1f} s (expected {expected / 2**20:.1f})")
    assert 0.75 * expected <= took <= 1.25 * expected
    quiet.stopping.set()
    quiet.join(5)
    assert quiet.latencies and max(quiet.latencies) < 1.0
    assert wait_for(lambda: set(quiet.acked) <= set(delivered_ids(emulator, "quiet.web")), 10)
    assert agg.metric("aggregator_limited_events_total", tenant="other") == 0


def post(agg: Aggregator, tag: str, body: bytes) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(f"{agg.http}/{tag}", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


def test_http_over_the_limit_is_429_with_retry_after_and_a_long_tag_is_refused_not_fatal(
    emulator: EmulatorThread, start_aggregator: StartAggregator
) -> None:
    agg = start_aggregator(limits_config(emulator.endpoint_url, """
[limits]
rate = "10KiB/s"
burst = "10KiB"
""", workers=1))  # fmt: skip
    body = orjson.dumps([{"log": "x" * 1000}] * 20)  # 20 KiB: more than the burst
    assert post(agg, "api.web", body)[0] == 200  # the burst pays for it, then goes below zero
    status, headers = post(agg, "api.web", body)
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert agg.metric("aggregator_limited_events_total", source="http",
                      reason="rate_limited") == 20  # fmt: skip

    with agg.connect() as sock:  # a 64 KiB tag, then an ordinary message, on one connection
        long_chunk, chunk = new_chunk_id(), new_chunk_id()
        sock.sendall(encode_message("t" * 65536, time.time(), {"a": 1}, chunk=long_chunk)
                     + encode_message("short.tag", time.time(), {"a": 2}, chunk=chunk))
        unpacker = msgpack.Unpacker(raw=False)
        while not (replies := list(unpacker)):
            unpacker.feed(sock.recv(4096))
        assert replies == [{"ack": chunk}]  # the long tag's message: refused, no ack
    assert agg.metric("aggregator_limited_events_total", reason="tag_too_long") == 1
    assert agg.metric("aggregator_input_errors_total") == 0  # not bad input: the connection lived


def test_on_a_connection_of_two_tenants_the_one_over_its_limit_is_refused_alone(
    emulator: EmulatorThread, start_aggregator: StartAggregator
) -> None:
    """What Fluentd or Fluent Bit forwarders send: several tenants on one connection. Slowing
    the connection down would delay the others: the over-limit tenant's messages are refused
    there, the other's acked at once."""
    agg = start_aggregator(limits_config(emulator.endpoint_url, """
[limits.overrides.noisy]
rate = "20KiB/s"
burst = "20KiB"
""", workers=1))  # fmt: skip
    latencies: dict[str, list[float]] = {"noisy.app": [], "calm.app": []}
    refused = 0
    with agg.connect(timeout=5) as sock:
        unpacker = msgpack.Unpacker(raw=False)
        for n in range(60):
            tag = "noisy.app" if n % 2 == 0 else "calm.app"
            entries = [[int(time.time()), {"n": n, "pad": "x" * 1000}]] * 10  # ~10 KiB
            chunk = new_chunk_id()
            started = time.monotonic()
            sock.sendall(encode_packed_forward(tag, entries, chunk=chunk))
            sock.settimeout(0.3)
            try:
                while not any(r.get("ack") == chunk for r in unpacker):
                    unpacker.feed(sock.recv(4096))
                latencies[tag].append(time.monotonic() - started)
            except TimeoutError:
                assert tag == "noisy.app", "the calm tenant's message was not acked"
                refused += 1
    assert len(latencies["calm.app"]) == 30 and max(latencies["calm.app"]) < 0.3
    assert refused > 10  # past its burst, most of the noisy tenant's messages
    limited = agg.metric("aggregator_limited_events_total", tenant="noisy", reason="rate_limited")
    assert limited == refused * 10
