"""Several workers: connections spread, crashes are survived, flushes and metrics span them all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import orjson

from aggregator.protocol import encode_forward, encode_message
from aggregator.supervisor import RESTART_BACKOFF_MIN
from emulator import EmulatorThread
from tests.integration.conftest import (
    FILE_CONFIG,
    Aggregator,
    StartAggregator,
    read_ndjson,
    wait_for,
)
from tests.integration.test_firehose import firehose_config, send_concurrently

HOUR_FLUSH = FILE_CONFIG.replace('flush_interval = "100ms"', 'flush_interval = "1h"')


def send_on_many_connections(agg: Aggregator, connections: int, per_connection: int) -> None:
    socks = [agg.connect() for _ in range(connections)]
    for c, sock in enumerate(socks):
        entries = [[1700000000, {"c": c, "i": i}] for i in range(per_connection)]
        sock.sendall(encode_forward("spread", entries))
    for sock in socks:
        sock.close()


def events_by_worker(directory: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for path in directory.glob("*.ndjson*"):
        worker = path.name.split(".")[2]  # events.<start>.w<N>.<seq>.ndjson
        counts[worker] += len(path.read_bytes().splitlines())
    return counts


def test_connections_spread_over_every_worker(start_aggregator: StartAggregator) -> None:
    agg = start_aggregator(FILE_CONFIG)
    send_on_many_connections(agg, connections=40, per_connection=10)
    assert wait_for(lambda: len(read_ndjson(agg.data_dir)) >= 400)
    assert agg.stop() == 0
    counts = events_by_worker(agg.data_dir)
    assert set(counts) == {"w0", "w1"}, counts
    assert min(counts.values()) >= 40, f"one worker took nearly everything: {counts}"


def test_a_killed_worker_is_restarted_and_the_service_keeps_accepting(
    start_aggregator: StartAggregator,
) -> None:
    agg = start_aggregator(FILE_CONFIG)
    before = agg.worker_pids()
    assert len(before) == 2
    # Events acked by the worker that survives must be delivered: find who serves what.
    send_on_many_connections(agg, connections=20, per_connection=5)
    assert wait_for(lambda: len(read_ndjson(agg.data_dir)) >= 100)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    after = wait_for(lambda: (p := agg.worker_pids()) and len(p) == 2 and victim not in p and p, 5)
    assert after, "the killed worker was not restarted"
    assert time.monotonic() - started < 1.0, "restart took more than a second"
    # Both ports keep accepting, whichever worker answers.
    for i in range(20):
        with agg.connect() as sock:
            sock.sendall(encode_message("after", 1700000000, {"i": i}))
        with urllib.request.urlopen(agg.http + "/app.after?json=%7B%22h%22%3A1%7D") as resp:
            assert resp.status == 200
    assert wait_for(lambda: agg.health()[0] == 200, timeout=5)
    assert agg.stop() == 0
    events = read_ndjson(agg.data_dir)
    assert sorted(e["i"] for e in events if e["tag"] == "after") == list(range(20))
    assert sum(1 for e in events if e["tag"] == "app.after") == 20
    assert sum(1 for e in events if e["tag"] == "spread") == 100  # all flushed before the kill
    assert any("died (killed by SIGKILL)" in e["message"] for e in agg.logs())


def test_health_is_503_while_a_worker_is_missing(start_aggregator: StartAggregator) -> None:
    agg = start_aggregator(FILE_CONFIG)
    status, body = agg.health()
    assert status == 200 and body["workers"] == {"expected": 2, "alive": 2}
    # Kill a worker and freeze its replacement while it starts, so the service stays one worker
    # short for as long as the test needs (a restart alone is over in about a second).
    survivor, victim = sorted(agg.worker_pids())
    os.kill(victim, signal.SIGKILL)
    replacement = wait_for(lambda: agg.worker_pids() - {survivor, victim}, 5)
    assert replacement, "the killed worker was not restarted"
    (frozen,) = replacement
    os.kill(frozen, signal.SIGSTOP)
    # A connection the kernel hands to the frozen worker's socket waits, so ask with a short
    # timeout: the surviving worker is the one that answers.
    seen = wait_for(lambda: (h := agg.health(timeout=0.2))[0] == 503 and h, timeout=10)
    os.kill(frozen, signal.SIGCONT)
    assert seen and "1 worker(s) missing" in seen[1]["problems"]
    assert seen[1]["workers"] == {"expected": 2, "alive": 1}
    assert wait_for(lambda: agg.health()[0] == 200, timeout=10)
    assert agg.metric("aggregator_worker_restarts_total") == 1
    assert agg.stop() == 0


def test_a_worker_whose_loop_is_stuck_is_killed_and_restarted(
    start_aggregator: StartAggregator,
) -> None:
    """Frozen (SIGSTOP) looks from outside exactly like an event loop stuck in one call."""
    config = FILE_CONFIG.replace("workers = 2", 'workers = 2\nworker_watchdog_timeout = "2s"')
    agg = start_aggregator(config)
    stuck, other = sorted(agg.worker_pids())
    os.kill(stuck, signal.SIGSTOP)
    started = time.monotonic()
    replacement = wait_for(lambda: agg.worker_pids() - {stuck, other}, timeout=10)
    assert replacement, "the stuck worker was not replaced"
    assert 2 <= time.monotonic() - started < 6
    assert other in agg.worker_pids()  # the healthy one was left alone
    assert wait_for(lambda: agg.health()[0] == 200, timeout=10)
    assert agg.metric("aggregator_worker_watchdog_kills_total") == 1
    assert [e for e in agg.logs() if "has not answered for" in e["message"]]
    assert agg.stop() == 0


def test_a_worker_that_keeps_dying_is_restarted_after_a_backoff(
    start_aggregator: StartAggregator,
) -> None:
    agg = start_aggregator(FILE_CONFIG)
    survivor, victim = sorted(agg.worker_pids())
    os.kill(victim, signal.SIGKILL)
    first = wait_for(lambda: agg.worker_pids() - {survivor, victim}, 5)
    assert first, "the killed worker was not restarted at once"
    (replacement,) = first
    os.kill(replacement, signal.SIGKILL)  # dies again soon after its start
    died = time.monotonic()
    second = wait_for(lambda: agg.worker_pids() - {survivor, victim, replacement}, 5)
    assert second, "the worker was not restarted after its second death"
    assert time.monotonic() - died >= RESTART_BACKOFF_MIN * 0.9  # it waited before spawning
    assert wait_for(lambda: agg.health()[0] == 200, timeout=10)
    assert agg.metric("aggregator_worker_restarts_total") == 2
    assert agg.stop() == 0


def test_flush_api_and_sigusr1_flush_every_worker(start_aggregator: StartAggregator) -> None:
    agg = start_aggregator(HOUR_FLUSH)
    send_on_many_connections(agg, connections=20, per_connection=5)
    time.sleep(0.5)
    assert read_ndjson(agg.data_dir) == []  # held by the hour-long interval, in both workers
    req = urllib.request.Request(agg.http + "/api/flush", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
    assert wait_for(lambda: len(read_ndjson(agg.data_dir)) == 100, timeout=5)
    assert len(events_by_worker(agg.data_dir)) == 2  # the other worker flushed too
    send_on_many_connections(agg, connections=20, per_connection=5)
    time.sleep(0.5)
    assert len(read_ndjson(agg.data_dir)) == 100
    agg.proc.send_signal(signal.SIGUSR1)
    assert wait_for(lambda: len(read_ndjson(agg.data_dir)) == 200, timeout=5)
    assert agg.stop() == 0


def test_metrics_across_workers_equal_what_firehose_received(
    emulator: EmulatorThread, start_aggregator: StartAggregator
) -> None:
    agg = start_aggregator(firehose_config(emulator.endpoint_url, "counted"))
    send_concurrently(agg.forward_port, total=3000, per_connection=250)
    wait_for(lambda: len(emulator.lines("counted")) >= 3000, timeout=30)
    received = emulator.stats()
    assert received["accepted_records"] == 3000
    # Input counters are published every half second.
    assert wait_for(lambda: agg.metric("aggregator_input_events_total", source="forward") == 3000)
    assert agg.metric("aggregator_output_events_total", destination="fh") == 3000
    assert agg.metric("aggregator_firehose_requests_total", destination="fh") == received["calls"]
    ids = Counter(orjson.loads(line)["id"] for line in emulator.lines("counted"))
    assert len(ids) == 3000 and max(ids.values()) == 1
    assert agg.stop() == 0


def test_second_sigterm_stops_at_once(
    emulator: EmulatorThread, start_aggregator: StartAggregator
) -> None:
    emulator.stall()
    agg = start_aggregator(firehose_config(emulator.endpoint_url, "stuck"))
    with socket.create_connection(("127.0.0.1", agg.forward_port)) as sock:
        sock.sendall(encode_forward("app", [[1700000000, {"i": 1}]]))
    time.sleep(0.5)  # flushed, and the call hangs
    agg.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    started = time.monotonic()
    status = agg.stop(signal.SIGTERM, timeout=10)
    assert time.monotonic() - started < 5
    assert status != 0
    logs = agg.logs()
    assert any("second stop signal" in e["message"] for e in logs)
    # The event the stalled call held is counted as abandoned, so the summary says so.
    summary = [e for e in logs if e["message"].startswith("stopped with undelivered")]
    assert summary and summary[0]["dropped"] == 1 and 3 in summary[0]["exit_codes"]
    emulator.resume()


def test_a_destination_that_cannot_start_stops_the_service_with_status_2(tmp_path: Path) -> None:
    config = tmp_path / "no-region.toml"
    config.write_text(
        FILE_CONFIG.replace("{forward_port}", "0").replace("{http_port}", "0")
        .replace("{data_dir}", str(tmp_path))
        + '\n[destinations.fh]\ntype = "firehose"\ndelivery_stream = "s"\n'
    )
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    proc = subprocess.run(
        [sys.executable, "-m", "aggregator", "run", "-c", str(config)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no AWS region" in proc.stderr
    assert "cannot start" in proc.stderr
