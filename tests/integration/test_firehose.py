"""The real process delivering to Firehose: a real moto server, and the emulator's faults."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import Counter
from typing import Any

import boto3
import msgpack
import orjson

from aggregator.protocol import encode_forward, encode_message, new_chunk_id
from emulator import EmulatorThread
from tests.conftest import create_s3_stream
from tests.integration.conftest import (
    BASE_CONFIG,
    StartAggregator,
    read_ndjson,
    wait_for,
)


def firehose_destination(name: str, endpoint: str, stream: str, aggregate: bool = False,
                         secondary: str | None = "dead", **buffer: Any) -> str:  # fmt: skip
    settings = {"flush_interval": "200ms", "retry_wait": "50ms", "retry_max_interval": "500ms",
                **buffer}  # fmt: skip
    buffer_toml = ", ".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in settings.items())
    return f"""
[destinations.{name}]
type = "firehose"
delivery_stream = "{stream}"
region = "us-east-1"
endpoint_url = "{endpoint}"
request_timeout = "5s"
aggregate = {"true" if aggregate else "false"}
{f'secondary = "{secondary}"' if secondary else ""}
inject = {{ tag_key = "tag" }}
buffer = {{ {buffer_toml} }}
"""


DEAD_LETTER = """
[destinations.dead]
type = "file"
path = "{data_dir}"
"""


def routes(*pairs: tuple[str, str]) -> str:
    return "".join(f'\n[[routes]]\nmatch = "{m}"\ndestination = "{d}"\n' for m, d in pairs)


def firehose_config(endpoint: str, stream: str, **kw: Any) -> str:
    """Everything to one Firehose destination ``fh``, with a file secondary ``dead``."""
    return (BASE_CONFIG + routes(("**", "fh")) + firehose_destination("fh", endpoint, stream, **kw)
            + DEAD_LETTER)  # fmt: skip


def recv_acks(sock: socket.socket, count: int) -> list[str]:
    unpacker = msgpack.Unpacker(raw=False)
    acks: list[str] = []
    while len(acks) < count:
        data = sock.recv(65536)
        assert data, "connection closed before every ack"
        unpacker.feed(data)
        acks += [obj["ack"] for obj in unpacker]
    return acks


def send_with_acks(port: int, tag: str, ids: range, per_message: int = 50) -> None:
    """Forward-mode messages with ``chunk``: every message acked before returning."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        chunks = []
        for start in range(ids.start, ids.stop, per_message):
            entries = [[1700000000, {"id": i, "log": f"event {i}"}]
                       for i in range(start, min(start + per_message, ids.stop))]  # fmt: skip
            chunk = new_chunk_id()
            chunks.append(chunk)
            sock.sendall(encode_forward(tag, entries, chunk=chunk))
        assert sorted(recv_acks(sock, len(chunks))) == sorted(chunks)


def send_concurrently(port: int, total: int, per_connection: int) -> None:
    """Events ``id`` 0..total-1 over total/per_connection connections at once, every message
    acked before this returns."""
    senders = [
        threading.Thread(target=send_with_acks, args=(port, "app", range(i, i + per_connection)))
        for i in range(0, total, per_connection)
    ]
    for t in senders:
        t.start()
    for t in senders:
        t.join(60)


def test_delivery_into_a_real_moto_firehose(
    moto_server: str, start_aggregator: StartAggregator
) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    bucket = f"logs-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    streams = {}
    for kind in ("packed", "single"):
        name = f"{kind}-{uuid.uuid4().hex[:8]}"
        create_s3_stream(moto_server, name, bucket=bucket, prefix=f"{kind}/")
        streams[kind] = name
    config = (
        BASE_CONFIG
        + routes(("backend.**", "archive"), ("**", "search"))
        + firehose_destination("search", moto_server, streams["single"])
        + firehose_destination("archive", moto_server, streams["packed"], aggregate=True)
        + DEAD_LETTER
    )
    agg = start_aggregator(config)
    send_with_acks(agg.forward_port, "frontend.web", range(0, 600))
    send_with_acks(agg.forward_port, "backend.api", range(600, 1500))
    assert agg.stop() == 0

    def events_under(prefix: str) -> list[dict[str, Any]]:
        listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        out = []
        for obj in listing:
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out += [orjson.loads(line) for line in body.splitlines() if line]
        return out

    single, packed = events_under("single/"), events_under("packed/")
    assert sorted(e["id"] for e in single) == list(range(0, 600))
    assert sorted(e["id"] for e in packed) == list(range(600, 1500))
    assert all(e["tag"] == "frontend.web" and e["log"] == f"event {e['id']}" for e in single)
    assert all(e["tag"] == "backend.api" for e in packed)
    assert read_ndjson(agg.data_dir) == []  # nothing in the dead-letter destination


def test_partial_failures_and_throttling_deliver_exactly_once(
    emulator: EmulatorThread, start_aggregator: StartAggregator
) -> None:
    emulator.configure(fail_rate=0.3, throttle_rate=0.2)
    agg = start_aggregator(
        firehose_config(emulator.endpoint_url, "faulty", chunk_limit_size="16KiB")
    )
    send_concurrently(agg.forward_port, total=4000, per_connection=1000)
    wait_for(lambda: len(emulator.lines("faulty")) >= 4000, timeout=60)
    ids = Counter(orjson.loads(line)["id"] for line in emulator.lines("faulty"))
    assert sorted(ids) == list(range(4000))
    assert max(ids.values()) == 1, "an event was delivered twice"
    stats = emulator.stats()
    assert stats["failed_records"] > 0 and stats["throttled_calls"] > 0
    assert agg.metric("aggregator_output_events_total", destination="fh") == 4000
    assert (
        agg.metric("aggregator_firehose_failed_records_total", destination="fh")
        == stats["failed_records"]
    )
    assert agg.metric("aggregator_retries_total", destination="fh") > 0
    assert agg.stop() == 0
    assert read_ndjson(agg.data_dir) == []


def test_oversized_and_refused_records_go_to_the_secondary(
    emulator: EmulatorThread, start_aggregator: StartAggregator
) -> None:
    emulator.configure(streams=["known"])
    config = (
        BASE_CONFIG
        + routes(("ghost", "ghost"), ("**", "fh"))
        + firehose_destination("fh", emulator.endpoint_url, "known")
        + firehose_destination("ghost", emulator.endpoint_url, "missing")
        + DEAD_LETTER
    )
    agg = start_aggregator(config)
    with socket.create_connection(("127.0.0.1", agg.forward_port)) as sock:
        sock.sendall(encode_message("big", 1700000000, {"id": 1, "log": "x" * 1_100_000}))
        sock.sendall(encode_message("small", 1700000000, {"id": 2}))
        sock.sendall(encode_message("ghost", 1700000000, {"id": 3}))
    dead = wait_for(lambda: (e := read_ndjson(agg.data_dir)) and len(e) >= 2 and e, timeout=10)
    assert sorted(e["id"] for e in dead) == [1, 3]
    assert [orjson.loads(x)["id"] for x in emulator.lines("known")] == [2]
    assert agg.metric("aggregator_secondary_events_total", reason="record_too_large") == 1
    assert agg.metric("aggregator_secondary_events_total", reason="resource_not_found") == 1
    assert agg.stop() == 0


def test_backpressure_blocks_the_sender_and_bounds_memory(
    emulator: EmulatorThread, start_aggregator: StartAggregator
) -> None:
    emulator.stall()
    agg = start_aggregator(firehose_config(
        emulator.endpoint_url, "slow", chunk_limit_size="64KiB", total_limit_size="512KiB",
    ))  # fmt: skip
    baseline = agg.rss_bytes()
    total_events, per_message = 40_000, 100
    payload = "y" * 900  # ~1 KB events: 40 MB in all, far over the limit and socket buffers
    sent = 0
    done = threading.Event()

    def send() -> None:
        nonlocal sent
        with socket.create_connection(("127.0.0.1", agg.forward_port), timeout=120) as sock:
            for start in range(0, total_events, per_message):
                entries = [[1700000000, {"id": i, "log": payload}]
                           for i in range(start, start + per_message)]  # fmt: skip
                sock.sendall(encode_forward("app", entries))
                sent = start + per_message
        done.set()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()

    def sender_stopped() -> bool:
        before = sent
        time.sleep(1)
        return sent == before

    assert wait_for(sender_stopped, timeout=30), "the sender kept going while the sink was stalled"
    assert not done.is_set(), "the sender was never slowed down"
    assert sent < total_events // 2
    growth = agg.rss_bytes() - baseline
    assert growth < 512 * 1024 + 48 * 1024 * 1024, f"RSS grew by {growth} bytes"
    # A full buffer takes the task out of a load balancer's rotation.
    health = wait_for(lambda: (h := agg.health())[0] == 503 and h, timeout=5)
    assert health and "buffer fh is" in str(health[1]["problems"])
    emulator.resume()
    assert done.wait(60), "the sender did not finish once the sink resumed"
    thread.join()
    wait_for(lambda: len(emulator.lines("slow")) >= total_events, timeout=60)
    ids = Counter(orjson.loads(line)["id"] for line in emulator.lines("slow"))
    assert len(ids) == total_events and max(ids.values()) == 1
    assert agg.stop() == 0


def test_sigterm_delivers_what_was_accepted(
    emulator: EmulatorThread, start_aggregator: StartAggregator
) -> None:
    emulator.configure(latency=0.3)
    agg = start_aggregator(firehose_config(emulator.endpoint_url, "slowish", flush_interval="1h"))
    send_with_acks(agg.forward_port, "app", range(500))
    assert agg.stop() == 0
    assert sorted(orjson.loads(x)["id"] for x in emulator.lines("slowish")) == list(range(500))


def test_sigterm_with_a_refusing_service_ends_in_the_secondary(
    emulator: EmulatorThread, start_aggregator: StartAggregator
) -> None:
    emulator.configure(throttle_rate=1.0)
    config = firehose_config(emulator.endpoint_url, "down").replace(
        'stop_timeout = "20s"', 'stop_timeout = "4s"'
    )
    agg = start_aggregator(config)
    send_with_acks(agg.forward_port, "app", range(300))
    started = time.monotonic()
    status = agg.stop()
    assert time.monotonic() - started < 10
    assert sorted(e["id"] for e in read_ndjson(agg.data_dir)) == list(range(300))
    assert emulator.lines("down") == []
    assert status == 1  # nothing lost, but not delivered where it was meant to go
    summary = [e for e in agg.logs() if e["message"].startswith("stopped with undelivered")]
    assert summary and summary[0]["to_secondary"] == 300 and summary[0]["dropped"] == 0


def test_sigterm_without_secondary_reports_the_loss(
    emulator: EmulatorThread, start_aggregator: StartAggregator
) -> None:
    emulator.configure(throttle_rate=1.0)
    config = firehose_config(emulator.endpoint_url, "down", secondary=None).replace(
        'stop_timeout = "20s"', 'stop_timeout = "3s"'
    )
    agg = start_aggregator(config)
    send_with_acks(agg.forward_port, "app", range(100))
    assert agg.stop() == 1
    summary = [e for e in agg.logs() if e["message"].startswith("stopped with undelivered")]
    assert summary and summary[0]["dropped"] == 100
