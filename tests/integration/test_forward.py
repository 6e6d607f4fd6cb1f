"""The forward input of the real process: every mode, acks, real clients, bad input."""

from __future__ import annotations

import contextlib
import socket
import time

import msgpack
import pytest
from fluent import sender

from aggregator.protocol import (
    EventTime,
    decode_ack,
    encode_forward,
    encode_message,
    encode_packed_forward,
    new_chunk_id,
)
from tests.integration.conftest import (
    FILE_CONFIG,
    Aggregator,
    StartAggregator,
    read_ndjson,
    wait_for,
)
from tests.test_formatting import deep


@pytest.fixture
def agg(start_aggregator: StartAggregator) -> Aggregator:
    return start_aggregator(FILE_CONFIG)


def events_of(agg: Aggregator, count: int, timeout: float = 10.0) -> list[dict[str, object]]:
    return (
        wait_for(lambda: (e := read_ndjson(agg.data_dir)) and len(e) >= count and e, timeout) or []
    )


def recv_ack(sock: socket.socket) -> str:
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        data = sock.recv(4096)
        assert data, "connection closed before the ack"
        unpacker.feed(data)
        for obj in unpacker:
            return decode_ack(msgpack.packb(obj))


ENCODERS = {
    "message": lambda tag, entries, chunk: b"".join(
        encode_message(tag, t, r, chunk=chunk) for t, r in entries
    ),
    "forward": lambda tag, entries, chunk: encode_forward(tag, entries, chunk=chunk),
    "packed": lambda tag, entries, chunk: encode_packed_forward(tag, entries, chunk=chunk),
    "compressed": lambda tag, entries, chunk: encode_packed_forward(
        tag, entries, chunk=chunk, compressed=True
    ),
}


@pytest.mark.parametrize("mode", list(ENCODERS))
@pytest.mark.parametrize("with_ack", [False, True], ids=["no-ack", "ack"])
def test_every_mode_delivers_every_event(agg: Aggregator, mode: str, with_ack: bool) -> None:
    entries = [[1700000000 + i, {"log": f"line {i}", "n": i}] for i in range(50)]
    entries[1][0] = EventTime(1700000001, 123_000_000)  # type: ignore[call-overload]
    chunk = new_chunk_id() if with_ack else None
    with agg.connect() as sock:
        if mode == "message" and chunk:
            for t, r in entries:  # one ack per message, as Docker's driver waits for each
                own = new_chunk_id()
                sock.sendall(encode_message("app.web", t, r, chunk=own))
                assert recv_ack(sock) == own
        else:
            sock.sendall(ENCODERS[mode]("app.web", entries, chunk))
            if chunk:
                assert recv_ack(sock) == chunk
    events = events_of(agg, 50)
    assert sorted(e["n"] for e in events) == list(range(50))  # type: ignore[type-var]
    assert all(e["tag"] == "app.web" for e in events)
    by_n = {e["n"]: e for e in events}
    assert by_n[0]["time"] == 1700000000
    assert by_n[1]["time"] == pytest.approx(1700000001.123)
    assert agg.stop() == 0


def test_many_messages_in_one_write_and_one_split_over_many(agg: Aggregator) -> None:
    many = b"".join(encode_message("t.many", 1700000000, {"i": i}) for i in range(200))
    big = encode_forward("t.split", [[1700000000, {"i": i, "pad": "x" * 100}] for i in range(100)])
    with agg.connect() as sock:
        sock.sendall(many)
        for i in range(0, len(big), 7):  # keep-alive connection, tiny writes
            sock.sendall(big[i : i + 7])
            if i % 700 == 0:
                time.sleep(0.001)
    events = events_of(agg, 300)
    assert sorted(e["i"] for e in events if e["tag"] == "t.many") == list(range(200))
    assert sorted(e["i"] for e in events if e["tag"] == "t.split") == list(range(100))


def test_fluent_logger_client(agg: Aggregator) -> None:
    plain = sender.FluentSender("docker", host="127.0.0.1", port=agg.forward_port)
    precise = sender.FluentSender(
        "docker", host="127.0.0.1", port=agg.forward_port, nanosecond_precision=True
    )
    try:
        for i in range(20):
            assert plain.emit("web", {"log": f"plain {i}", "i": i})
            assert precise.emit_with_time("api", 1700000000.5, {"log": f"precise {i}", "i": i})
    finally:
        plain.close()
        precise.close()
    events = events_of(agg, 40)
    assert sorted(e["i"] for e in events if e["tag"] == "docker.web") == list(range(20))
    api = [e for e in events if e["tag"] == "docker.api"]
    assert len(api) == 20
    assert all(e["time"] == pytest.approx(1700000000.5) for e in api)


def test_invalid_utf8_is_delivered_with_replacement(agg: Aggregator) -> None:
    # A raw msgpack str holding bytes that are not UTF-8, as containers print binary junk.
    record = b"\x82\xa3log\xa6ok\xff\xfe\x00!\xa1i\x01"
    message = b"\x93\xa6binary\xce" + (1700000000).to_bytes(4, "big") + record
    with agg.connect() as sock:
        sock.sendall(message + encode_message("binary", 1700000000, {"i": 2}))
    events = events_of(agg, 2)
    assert {e["i"] for e in events} == {1, 2}
    junk = next(e for e in events if e["i"] == 1)
    assert junk["log"] == "ok\ufffd\ufffd\x00!"


def test_bad_input_closes_only_that_connection(agg: Aggregator) -> None:
    good = agg.connect()
    good.sendall(encode_message("good", 1700000000, {"i": 0}))
    cases = {
        "not_msgpack": b"\xc1\xc1\xc1\xc1",
        "bad_shape": msgpack.packb({"not": "an array"}),
        "bad_tag": msgpack.packb([42, 1700000000, {"a": 1}]),
    }
    for reason, payload in cases.items():
        with agg.connect() as bad:
            bad.sendall(payload)
            bad.settimeout(5)
            assert bad.recv(100) == b"", f"{reason}: connection should be closed"
    for reason in cases:
        assert agg.metric("aggregator_input_errors_total", reason=reason) == 1, reason
    # The good connection and the process carry on.
    chunk = new_chunk_id()
    good.sendall(encode_message("good", 1700000000, {"i": 1}, chunk=chunk))
    assert recv_ack(good) == chunk
    good.close()
    events = events_of(agg, 2)
    assert sorted(e["i"] for e in events if e["tag"] == "good") == [0, 1]
    assert not any(e["tag"] == "t" for e in events)


def test_one_bad_event_costs_only_itself(agg: Aggregator) -> None:
    """200 good Message-mode events, a NaN time, a record that is not a map, one nested past
    JSON's limit, a binary key, then 50 good: in one write, the last one asking for an ack."""
    good = [encode_message("app", 1700000000, {"i": i}) for i in range(200)]
    bad = [
        encode_message("app", float("nan"), {"i": -1}),
        msgpack.packb(["app", 1700000000, "not a map"]),
        encode_message("app", 1700000000, deep(300)),
    ]
    binary_key = msgpack.packb(["app", 1700000000, {b"i": 1000}], use_bin_type=True)
    more = [encode_message("app", 1700000000, {"i": i}) for i in range(300, 349)]
    chunk = new_chunk_id()
    last = encode_message("app", 1700000000, {"i": 349}, chunk=chunk)
    with agg.connect() as sock:
        sock.sendall(b"".join([*good, *bad, binary_key, *more, last]))
        assert recv_ack(sock) == chunk  # the connection carries on
    events = events_of(agg, 251)
    assert sorted(e["i"] for e in events) == [*range(200), *range(300, 350), 1000]
    assert agg.metric("aggregator_input_errors_total", reason="bad_event") == 3
    assert [e for e in agg.logs() if e["message"] == "events left out: they cannot be encoded"]
    assert not [e for e in agg.logs() if "Traceback" in str(e) or e["level"] == "raw"]


def test_entries_that_are_not_pairs_skip_the_filters_and_are_counted(
    start_aggregator: StartAggregator,
) -> None:
    """A Forward and a PackedForward message holding a number, a nil, a one-item array and a
    string among good events, through a grep filter and Docker's partials filter: the good
    events go on filtered, the others are left out and counted, and the connection carries
    on (a filter indexed them: the read failed and the connection was dropped, uncounted)."""
    agg = start_aggregator(FILE_CONFIG.replace("[[routes]]", """[[filters]]
type = "grep"
match = "**"
exclude = [{ key = "drop", pattern = "/yes/" }]

[[filters]]
type = "docker_partials"
match = "**"

[[routes]]""", 1))  # fmt: skip
    good = [[1700000000, {"i": 0}], [1700000000, {"i": 1, "drop": "yes"}]]
    odd: list[object] = [5, None, [1700000000], "text"]
    forward = msgpack.packb(["app", [good[0], *odd, good[1]]])
    packed = encode_packed_forward("app", [(1700000000, {"i": 2})])
    packed = msgpack.packb(["app", msgpack.unpackb(packed)[1] + b"".join(map(msgpack.packb, odd))])
    chunk = new_chunk_id()
    with agg.connect() as sock:
        sock.sendall(forward + packed + encode_message("app", 1700000000, {"i": 3}, chunk=chunk))
        assert recv_ack(sock) == chunk  # the connection carries on
    events = events_of(agg, 3)
    assert sorted(e["i"] for e in events) == [0, 2, 3]
    assert agg.metric("aggregator_input_errors_total", reason="bad_event") == 2 * len(odd)
    assert not [e for e in agg.logs() if "Traceback" in str(e) or e["level"] == "raw"]


def test_message_over_the_size_limit(start_aggregator: StartAggregator) -> None:
    agg = start_aggregator(
        FILE_CONFIG.replace(
            "port = {forward_port}", 'port = {forward_port}\nmessage_length_limit = "64KiB"'
        )
    )
    with agg.connect() as sock:
        sock.sendall(encode_message("ok", 1700000000, {"log": "x" * 1000}))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(encode_message("big", 1700000000, {"log": "x" * 300_000}))
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""
    assert agg.metric("aggregator_input_errors_total", reason="message_too_large") == 1
    assert [e["tag"] for e in events_of(agg, 1)] == ["ok"]


def test_udp_heartbeat_is_answered(agg: Aggregator) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.sendto(b"\x00", ("127.0.0.1", agg.forward_port))
        assert udp.recvfrom(16)[0] == b"\x00"


def test_unmatched_tags_are_counted(start_aggregator: StartAggregator) -> None:
    config = FILE_CONFIG.replace('match = "**"', 'match = "app.**"')
    agg = start_aggregator(config)
    chunk = new_chunk_id()
    with agg.connect() as sock:
        sock.sendall(encode_forward("other", [[1700000000, {"a": 1}]] * 3, chunk=chunk))
        assert recv_ack(sock) == chunk  # handled, as Fluentd acks unmatched events
    assert wait_for(lambda: agg.metric("aggregator_unmatched_events_total") == 3)
    assert agg.stop() == 0
    assert any("no route matches" in e["message"] for e in agg.logs())
