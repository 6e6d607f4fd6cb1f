"""Redeploys and scale-in as users run them: real processes stopped under steady traffic from
clients that behave like Docker's driver, with and without acks; stops that must fit a kill
timer while Firehose refuses and throttles; the hand-off to the instances still running."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from benchmarks.docker_client import DockerLikeClient
from emulator import EmulatorThread
from tests.integration.conftest import (
    Aggregator,
    StartAggregator,
    free_port,
    read_ndjson,
    server_block,
    wait_for,
)
from tests.integration.test_firehose import (
    DEAD_LETTER,
    firehose_destination,
    routes,
    send_concurrently,
)

STOPS = 20


def instance_config(endpoint: str, forward_port: int | str = "{forward_port}",
                    http_port: int | str = "{http_port}", *, workers: int = 1,
                    stop_timeout: str = "20s", handoff: int | None = None,
                    max_connection_age: str | None = "2s", secondary: str | None = "dead",
                    **buffer: Any) -> str:  # fmt: skip
    """Everything to one Firehose destination ``fh`` at ``endpoint``, its ``buffer`` settings
    given, with a file secondary ``dead`` unless ``secondary`` is None."""
    age_line = f'max_connection_age = "{max_connection_age}"' if max_connection_age else ""
    return server_block(workers, stop_timeout, handoff) + f"""
[[sources]]
type = "forward"
bind = "127.0.0.1"
port = {forward_port}
{age_line}

[[sources]]
type = "http"
bind = "127.0.0.1"
port = {http_port}
""" + routes(("**", "fh")) + firehose_destination("fh", endpoint, "logs", secondary=secondary,
                                                    **buffer) + (DEAD_LETTER if secondary else "")


def ids_of(lines: list[bytes], client: str | None = None) -> Counter[int]:
    events = (orjson.loads(line) for line in lines)
    return Counter(e["id"] for e in events if client is None or e.get("client") == client)


@pytest.fixture
def clients() -> Iterator[list[DockerLikeClient]]:
    made: list[DockerLikeClient] = []
    yield made
    for client in made:
        client.stopping.set()


def test_rolling_restarts_lose_nothing(
    emulator: EmulatorThread, start_aggregator: StartAggregator, clients: list[DockerLikeClient]
) -> None:
    """Two instances behind one address list, as behind a load balancer: the one the clients
    use is stopped (SIGTERM) and started again, STOPS times, while they send every 5 ms."""
    forward = [free_port(), free_port()]
    http = [free_port(), free_port()]

    def start(i: int) -> Aggregator:
        return start_aggregator(instance_config(emulator.endpoint_url, forward[i], http[i],
                                                flush_interval="100ms"))  # fmt: skip

    running = [start(0), start(1)]
    clients += [DockerLikeClient(forward, "plain"), DockerLikeClient(forward, "acked", acks=True)]
    for client in clients:
        client.start()
    statuses = []
    for stop in range(STOPS):
        i = stop % 2  # the clients are on this one: they moved here at the previous stop
        marks = [len(c.sent) + 20 for c in clients]  # some traffic through this instance first
        wait_for(lambda m=marks: all(len(c.sent) > n for c, n in zip(clients, m, strict=True)))
        statuses.append(running[i].stop(timeout=30))
        running[i] = start(i)
    for client in clients:
        client.stop()
    plain, acked = clients
    total = len(plain.sent) + len(acked.sent)
    wait_for(lambda: len(emulator.lines("logs")) >= total, timeout=30)
    for agg in running:
        statuses.append(agg.stop(timeout=30))
    lines = emulator.lines("logs")
    delivered = {c.client: ids_of(lines, c.client) for c in clients}
    lost = {c.client: sorted(set(c.sent) - set(delivered[c.client])) for c in clients}
    assert lost == {"plain": [], "acked": []}, f"lost over {STOPS} stops"
    assert plain.failed == acked.failed == []
    assert max(delivered["acked"].values()) == 1, "an acked event was delivered twice"
    assert statuses == [0] * (STOPS + 2)
    assert plain.reconnects >= STOPS and acked.reconnects >= STOPS
    assert read_ndjson(running[0].data_dir) == read_ndjson(running[1].data_dir) == []


def test_a_stop_under_refusals_hands_off_and_beats_the_kill_timer(
    start_aggregator: StartAggregator,
) -> None:
    """Firehose refuses one record in seven, throttles and answers slowly: the stop cannot
    deliver everything in its 10 s, so the rest goes to the instance still running."""
    with EmulatorThread(seed=7, fail_rate=1 / 7, throttle_rate=0.3, latency=1.0) as slow, \
         EmulatorThread(seed=8) as healthy:  # fmt: skip
        peer_port = free_port()
        peer = start_aggregator(instance_config(healthy.endpoint_url, peer_port))
        stopping = start_aggregator(instance_config(
            slow.endpoint_url, workers=2, stop_timeout="10s",
            handoff=peer_port, chunk_limit_size="8KiB", flush_thread_count=2,
        ))  # fmt: skip
        send_concurrently(stopping.forward_port, total=20_000, per_connection=1000)
        started = time.monotonic()
        status = stopping.stop(timeout=30)
        elapsed = time.monotonic() - started
        assert elapsed < 10, f"the stop took {elapsed:.1f} s: past the kill timer"
        wait_for(lambda: len(healthy.lines("logs")) + len(slow.lines("logs")) >= 20_000, 20)
        assert peer.stop() == 0
        everywhere = ids_of(slow.lines("logs")) + ids_of(healthy.lines("logs"))
        everywhere += Counter(e["id"] for e in read_ndjson(stopping.data_dir))
        assert set(everywhere) == set(range(20_000)), "acked events were lost"
        summary = [e for e in stopping.logs() if e["message"].startswith("stopped")]
        handed_off = summary[-1]["handed_off"]
        assert handed_off > 0 and len(ids_of(healthy.lines("logs"))) >= handed_off
        assert status == (0 if summary[-1]["to_secondary"] == 0 else 1)


def test_with_the_hand_off_unreachable_the_rest_goes_to_the_secondary_in_time(
    start_aggregator: StartAggregator,
) -> None:
    with EmulatorThread(seed=9, throttle_rate=1.0) as down:
        agg = start_aggregator(instance_config(
            down.endpoint_url, stop_timeout="6s", handoff=free_port(),
        ))  # fmt: skip
        send_concurrently(agg.forward_port, total=2000, per_connection=500)
        started = time.monotonic()
        assert agg.stop(timeout=30) == 1
        assert time.monotonic() - started < 6
        assert sorted(e["id"] for e in read_ndjson(agg.data_dir)) == list(range(2000))
        summary = [e for e in agg.logs() if e["message"].startswith("stopped with undelivered")]
        assert summary[-1]["to_secondary"] == 2000 and summary[-1]["handed_off"] == 0
        assert any(e["message"] == "hand-off connection failed; trying again" for e in agg.logs())


def test_sigterm_to_the_whole_process_group_is_one_graceful_stop(
    start_aggregator: StartAggregator,
) -> None:
    """What tini -g, dumb-init and systemd do: every process gets SIGTERM, and the supervisor
    passes one on as well."""
    with EmulatorThread(seed=10, latency=0.3) as slowish:
        agg = start_aggregator(
            instance_config(slowish.endpoint_url, workers=2, flush_interval="1h"),
            own_process_group=True,
        )  # fmt: skip
        send_concurrently(agg.forward_port, total=3000, per_connection=500)
        workers = agg.worker_pids()
        os.killpg(agg.proc.pid, signal.SIGTERM)
        # The supervisor passes a SIGTERM on at once, and two sent a moment apart can merge
        # into one (signals do not queue) while a worker waits for the CPU: one more, a little
        # later, while the slow sink keeps them stopping, is surely a second one.
        time.sleep(0.1)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        assert agg.proc.wait(30) == 0
        assert sorted(ids_of(slowish.lines("logs"))) == list(range(3000))
        messages = [e["message"] for e in agg.logs()]
        assert not [m for m in messages if "second stop signal" in m or "forced" in m]
        assert "stop signal while stopping: ignored (already stopping)" in messages
