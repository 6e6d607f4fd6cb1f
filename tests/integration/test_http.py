"""The HTTP input of the real process: Fluentd in_http compatibility and the service endpoints."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import msgpack
import orjson
import pytest

from aggregator.control import is_loopback
from tests.integration.conftest import (
    FILE_CONFIG,
    Aggregator,
    StartAggregator,
    read_ndjson,
    wait_for,
)

HEALTH_CHECK_PATH = "/healthcheck?json=%7B%22log%22%3A+%22health+check%22%7D"


@pytest.fixture
def agg(start_aggregator: StartAggregator) -> Aggregator:
    config = FILE_CONFIG.replace('match = "health*"', 'match = "health.internal"')
    return start_aggregator(config)


def http_config(setting: str) -> str:
    """FILE_CONFIG with one more line in its [[sources]] http table."""
    return FILE_CONFIG.replace("port = {http_port}", "port = {http_port}\n" + setting)


def request(
    agg: Aggregator, path: str, data: bytes | None = None, content_type: str | None = None,
    method: str | None = None,
) -> tuple[int, bytes]:  # fmt: skip
    req = urllib.request.Request(agg.http + path, data=data, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def events_of(agg: Aggregator, count: int) -> list[dict[str, Any]]:
    return wait_for(lambda: (e := read_ndjson(agg.data_dir)) and len(e) >= count and e) or []


def test_container_health_check_gets_200_and_is_routed(agg: Aggregator) -> None:
    assert request(agg, HEALTH_CHECK_PATH) == (200, b"")
    if shutil.which("curl"):  # the exact command of the ECS container health check
        out = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", agg.http + HEALTH_CHECK_PATH],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        assert out.stdout == "200"
    events = events_of(agg, 1)
    assert events[0]["tag"] == "healthcheck"
    assert events[0]["log"] == "health check"


def test_in_http_request_forms(agg: Aggregator) -> None:
    form = urllib.parse.urlencode({"json": json.dumps({"form": 1}), "time": "1700000000.5"})
    assert request(agg, "/app.form", form.encode(), "application/x-www-form-urlencoded")[0] == 200
    packed = urllib.parse.urlencode({"msgpack": msgpack.packb({"mp_form": 1})}, encoding="latin-1")
    assert request(agg, "/app.form", packed.encode(), "application/x-www-form-urlencoded")[0] == 200
    assert request(agg, "/app/json", b'{"body": 1}', "application/json")[0] == 200
    assert request(agg, "/app.batch", b'[{"b": 1}, {"b": 2}]', "application/json")[0] == 200
    assert (
        request(agg, "/app.mp", msgpack.packb([{"m": 1}, {"m": 2}]), "application/msgpack")[0]
        == 200
    )
    assert request(agg, "/app.nd", b'{"nd": 1}\n{"nd": 2}\n', "application/x-ndjson")[0] == 200
    query = urllib.parse.urlencode({"json": '{"q": 1}', "time": "1700000000"})
    assert request(agg, "/app.query?" + query, method="POST")[0] == 200
    events = events_of(agg, 10)
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_tag.setdefault(e["tag"], []).append(e)
    assert {e.get("form", e.get("mp_form")) for e in by_tag["app.form"]} == {1}
    assert next(e for e in by_tag["app.form"] if "form" in e)["time"] == 1700000000.5
    assert by_tag["app.json"][0]["body"] == 1  # /app/json is tag app.json
    assert sorted(e["b"] for e in by_tag["app.batch"]) == [1, 2]
    assert sorted(e["m"] for e in by_tag["app.mp"]) == [1, 2]
    assert sorted(e["nd"] for e in by_tag["app.nd"]) == [1, 2]
    assert by_tag["app.query"][0]["time"] == 1700000000


@pytest.mark.parametrize(
    ("path", "body", "content_type"),
    [
        ("/app", b"{not json", "application/json"),
        ("/app", b'"a string"', "application/json"),
        ("/app", b"[1, 2]", "application/json"),
        ("/app", None, None),
        ("/", b'{"a": 1}', "application/json"),
        ("/app?time=soon&json=%7B%7D", None, None),
        ("/app?time=nan&json=%7B%7D", None, None),
        ("/app", b'{"d":' * 300 + b"{}" + b"}" * 300, "application/json"),
    ],
)
def test_bad_requests_get_400_with_a_reason(
    agg: Aggregator, path: str, body: bytes | None, content_type: str | None
) -> None:
    status, text = request(agg, path, body, content_type)
    assert status == 400
    assert text.startswith(b"400 Bad Request\n") and len(text) > len(b"400 Bad Request\n")


def test_body_over_the_limit_gets_413(start_aggregator: StartAggregator) -> None:
    agg = start_aggregator(http_config('body_size_limit = "1KiB"'))
    assert request(agg, "/app", b'{"a": "' + b"x" * 4096 + b'"}', "application/json")[0] == 413


def test_health_flush_and_metrics(start_aggregator: StartAggregator) -> None:
    agg = start_aggregator(FILE_CONFIG.replace('flush_interval = "100ms"', 'flush_interval = "1h"'))
    assert request(agg, "/app", b'{"a": 1}', "application/json")[0] == 200

    def health() -> dict[str, Any]:
        status, body = request(agg, "/api/health")
        assert status == 200
        parsed: dict[str, Any] = json.loads(body)
        return parsed

    assert health()["status"] == "ok"
    # The buffer gauges every worker publishes at least once a second.
    assert wait_for(lambda: health()["destinations"]["local"]["buffered_bytes"] > 0, timeout=5)
    assert read_ndjson(agg.data_dir) == []  # the hour-long interval holds it
    assert request(agg, "/api/flush", b"", method="POST")[0] == 200
    assert events_of(agg, 1)[0]["a"] == 1
    status, text = request(agg, "/metrics")
    assert status == 200
    assert b"aggregator_input_events_total" in text
    assert agg.metric("aggregator_input_events_total", source="http") == 1
    assert agg.metric("aggregator_output_events_total", destination="local") == 1


def test_bodies_over_the_entries_limit_get_400_before_they_are_decoded(
    start_aggregator: StartAggregator,
) -> None:
    """Issue 8: an 8 MiB msgpack array of empty maps got a worker OOM-killed."""
    agg = start_aggregator(http_config("body_entries_limit = 1000"))
    empty_maps = b"\xdd" + (8 * 1024 * 1024).to_bytes(4, "big") + b"\x80" * (8 * 1024 * 1024)
    status, text = request(agg, "/app", empty_maps, "application/msgpack")
    assert status == 400 and b"max_array_len" in text
    status, text = request(agg, "/app", orjson.dumps([{"i": i} for i in range(1001)]),
                           "application/json")  # fmt: skip
    assert status == 400 and b"at most 1000" in text
    status, _ = request(agg, "/app", orjson.dumps([{"i": i} for i in range(1000)]),
                        "application/json")  # fmt: skip
    assert status == 200
    assert len(events_of(agg, 1000)) == 1000


def test_a_body_that_never_arrives_gets_408_at_body_timeout(
    start_aggregator: StartAggregator,
) -> None:
    """Issue 8: `Content-Length: 10^12` and a 10-byte body held the request forever."""
    agg = start_aggregator(http_config('body_timeout = "500ms"'))
    with socket.create_connection(("127.0.0.1", agg.http_port), timeout=10) as sock:
        sock.sendall(b"POST /app HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000000\r\n\r\n{\"a\": 1}, ")  # fmt: skip
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
    assert agg.metric("aggregator_input_errors_total", reason="body_timeout") == 1


def test_a_request_head_must_arrive_within_keepalive_timeout(
    start_aggregator: StartAggregator,
) -> None:
    """Issue 8: request heads trickled at a byte a second held HTTP connections forever."""
    agg = start_aggregator(http_config('keepalive_timeout = "1s"'))
    head = b"POST /app HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    with (
        socket.create_connection(("127.0.0.1", agg.http_port), timeout=10) as trickle,
        socket.create_connection(("127.0.0.1", agg.http_port), timeout=10) as silent,
    ):
        started = time.monotonic()
        sent = 0
        while sent < len(head):  # a byte every 0.1 s: the head would take 100 s
            try:
                trickle.sendall(head[sent : sent + 1])
            except OSError:
                break
            sent += 1
            time.sleep(0.1)
            if not _open(trickle):
                break
        assert not _open(trickle) and time.monotonic() - started < 5, sent
        assert silent.recv(1) == b""  # closed, though it never sent a byte
    # a client that keeps its connection busy is not affected
    with socket.create_connection(("127.0.0.1", agg.http_port), timeout=10) as sock:
        for _ in range(4):
            sock.sendall(b"GET /app?json=%7B%7D HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(0.5)


def _open(sock: socket.socket) -> bool:
    """Whether the server has not closed ``sock`` (nothing is ever sent to it here)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def test_the_control_plane_wants_its_token(start_aggregator: StartAggregator) -> None:
    agg = start_aggregator(http_config('control_token = "${TOKEN}"'), env={"TOKEN": "s3cret"})
    for path, method in (("/api/flush", "POST"), ("/metrics", "GET")):
        assert request(agg, path, method=method)[0] == 401, path
        req = urllib.request.Request(agg.http + path, method=method)
        req.add_header("Authorization", "Bearer s3cret")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200, path
        req.add_header("Authorization", "Bearer wrong")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(req, timeout=10)
    assert agg.health()[0] == 200  # the load balancer's check needs no token


def test_a_flush_storm_is_a_flush_or_two(agg: Aggregator) -> None:
    """Issue 8: a /api/flush storm multiplied PutRecordBatch calls 45 times."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(30) as pool:
        statuses = list(pool.map(lambda _: request(agg, "/api/flush", method="POST")[0], range(30)))
    assert set(statuses) <= {200, 429}
    assert 1 <= statuses.count(200) <= 4  # one per worker, two if a second boundary fell inside


def test_web_pages_cannot_post_unless_their_origin_is_allowed(
    start_aggregator: StartAggregator,
) -> None:
    agg = start_aggregator(http_config('cors_allow_origins = ["https://ok.example"]'))

    def post(origin: str | None, method: str = "POST") -> tuple[int, dict[str, str]]:
        req = urllib.request.Request(agg.http + "/app", data=b'{"a": 1}', method=method)
        req.add_header("Content-Type", "application/json")
        if origin:
            req.add_header("Origin", origin)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers)

    assert post(None)[0] == 200
    assert post("https://evil.example")[0] == 403
    status, headers = post("https://ok.example")
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://ok.example"
    assert post("https://ok.example", method="OPTIONS")[0] == 200
    assert len(events_of(agg, 2)) == 2
    assert agg.metric("aggregator_input_errors_total", reason="origin_refused") == 1


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("10.0.0.5", False),
     ("::ffff:10.0.0.5", False), (None, False), ("", False)],
)  # fmt: skip
def test_only_this_hosts_addresses_are_loopback(address: str | None, loopback: bool) -> None:
    assert is_loopback(address) is loopback
