"""Differential tests against Fluentd itself: the same fluent.conf and the same input through
Fluentd 1.16 (``../shared/peers/fluentd``, with the Kinesis plugin and fluent-plugin-concat) and
through ``aggregator run -c fluent.conf``, each into its own stream of one Firehose emulator;
the records that arrive must be the same multiset.

Skipped where that Fluentd build is not on the machine (the Makefile installs its Debian
packages when it is)."""

from __future__ import annotations

import gzip
import socket
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import orjson

from aggregator.protocol import encode_message, new_chunk_id
from emulator import EmulatorThread
from tests.integration.conftest import StartAggregator, StartFluentd, needs_fluentd, wait_for

FIXTURES = Path(__file__).parents[1] / "config" / "fluentd"

pytestmark = needs_fluentd


def send(port: int, messages: list[tuple[str, dict[str, Any]]]) -> None:
    """Message mode with acks, one message at a time (Docker's driver with acks)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        unpacker = msgpack.Unpacker(raw=False)
        for i, (tag, record) in enumerate(messages):
            chunk = new_chunk_id()
            sock.sendall(encode_message(tag, 1700000000 + i, record, chunk=chunk))
            while not any(reply.get("ack") == chunk for reply in unpacker):
                data = sock.recv(4096)
                assert data, "closed before the ack"
                unpacker.feed(data)


def records(emulator: EmulatorThread, stream: str) -> Counter[bytes]:
    return Counter(orjson.dumps(orjson.loads(line), option=orjson.OPT_SORT_KEYS)
                   for line in emulator.lines(stream))  # fmt: skip


Reader = Callable[[EmulatorThread, str], Counter[bytes]]
"""What arrived for one of the two (its STREAM), as a multiset to compare."""


def run_both(
    conf: Path, messages: list[tuple[str, dict[str, Any]]], expected: int,
    emulator: EmulatorThread, fluentd: StartFluentd, start_aggregator: StartAggregator,
    read: Reader = records, **more_env: str,
) -> tuple[Counter[bytes], Counter[bytes]]:  # fmt: skip
    env = {"FIREHOSE_ENDPOINT": emulator.endpoint_url, "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1", **more_env}  # fmt: skip
    theirs = fluentd(conf, {**env, "STREAM": "fluentd"})
    text = conf.read_text().replace("\"#{ENV['FORWARD_PORT']}\"", "{forward_port}")
    ours = start_aggregator(text, suffix=".conf", env={**env, "STREAM": "aggregator"})
    send(theirs, messages)
    send(ours.forward_port, messages)
    done = lambda: all(sum(read(emulator, s).values()) >= expected  # noqa: E731
                       for s in ("fluentd", "aggregator"))  # fmt: skip
    assert wait_for(done, 30), shown(read(emulator, "fluentd"), read(emulator, "aggregator"))
    time.sleep(1.5)  # anything more than expected would arrive by now
    assert ours.stop() == 0
    return read(emulator, "fluentd"), read(emulator, "aggregator")


def shown(theirs: Counter[bytes], ours: Counter[bytes]) -> str:
    def lines(records: Counter[bytes]) -> str:
        return "".join(f"\n  {n} x {r.decode()}" for r, n in sorted(records.items()))

    return f"Fluentd's:{lines(theirs)}\nours:{lines(ours)}"


def docker(text: str, **extra: Any) -> dict[str, Any]:
    return {"container_id": "c0ffee", "container_name": "/ecs-web-1", "source": "stdout",
            "log": text, **extra}  # fmt: skip


def partial(text: str, pid: str, ordinal: int, last: bool) -> dict[str, Any]:
    return docker(text, partial_message="true", partial_id=pid, partial_ordinal=str(ordinal),
                  partial_last="true" if last else "false")  # fmt: skip


def test_concat_parser_grep_and_record_transformer_as_fluentd_runs_them(
    emulator: EmulatorThread, fluentd: StartFluentd, start_aggregator: StartAggregator
) -> None:
    long_json = '{"level": "info", "message": "' + "x" * 40 + '", "n": 3}'
    messages: list[tuple[str, dict[str, Any]]] = [
        # Docker's split line, three parts (its JSON only whole once joined)
        ("docker.web.api", partial(long_json[:20], "p1", 1, False)),
        ("docker.web.api", partial(long_json[20:45], "p1", 2, False)),
        ("docker.web.api", partial(long_json[45:], "p1", 3, True)),
        # a time key in the JSON: the event's time, out of the record
        ("docker.web.api", docker('{"level": "warn", "time": 1700000100, "msg": "late"}')),
        # not JSON, kept by reserve_data
        ("docker.web.api", docker("{not json at all", level="error")),
        # nested records, a health check dropped by its nested path
        ("docker.web.api", docker('{"level": "info", "request": {"path": "/health", "ms": 1}}')),
        ("docker.web.api", docker('{"level": "info", "request": {"path": "/pay", "ms": 12}}')),
        # non-ASCII text, and a level grep keeps nothing of (but source stdout it does)
        ("docker.web.api", docker('{"level": "débug", "msg": "ünïcødé ✓ 日本"}')),
        # other tags: no concat, no parser
        ("app.billing.worker", {"level": "error", "partial_extra": 1, "nested": {"a": [1, 2]}}),
        ("app.billing.worker", {"level": "trace", "source": "stderr"}),  # dropped by grep
        ("single", {"level": "info", "ünï": "cødé"}),
    ]
    theirs, ours = run_both(FIXTURES / "filters.conf", messages, 7, emulator, fluentd,
                            start_aggregator)  # fmt: skip
    assert ours == theirs, shown(theirs, ours)
    assert sum(ours.values()) == 7


def test_filters_inside_a_label_as_fluentd_runs_them(
    emulator: EmulatorThread, fluentd: StartFluentd, start_aggregator: StartAggregator
) -> None:
    messages: list[tuple[str, dict[str, Any]]] = [
        ("app.shop", {"message": "GET /cart 200 512"}),
        ("app.shop", {"message": "POST /pay 503"}),  # dropped by the grep
        ("app.shop", {"message": "not a request line"}),  # dropped: no error event either
        ("app.search.v2", {"message": "GET /q?x=ü 404 7", "other": 1}),
        ("app", {"message": "DELETE /x 204"}),  # tag_parts[1] does not exist: null
        ("other.thing", {"message": "GET / 200"}),  # the label has no route for it
    ]
    theirs, ours = run_both(FIXTURES / "filters-in-label.conf", messages, 3, emulator, fluentd,
                            start_aggregator)  # fmt: skip
    assert ours == theirs, shown(theirs, ours)
    assert sum(ours.values()) == 3


def kinesis_records(emulator: EmulatorThread, stream: str) -> Counter[bytes]:
    """Each record of the three streams, as sent (data_key) or decompressed (gzip, zlib: Ruby's
    gzip header has its own time stamp), behind its stream's name."""
    seen: Counter[bytes] = Counter()
    for kind, decode in (("raw", bytes), ("gz", gzip.decompress), ("zl", zlib.decompress)):
        for data in emulator.records(f"{stream}-{kind}"):
            body = data if kind == "raw" else decode(data[:-1]) + b" + " + data[-1:]
            seen[kind.encode() + b": " + body] += 1
    return seen


def test_data_key_and_compression_send_what_the_kinesis_plugin_sends(
    emulator: EmulatorThread, fluentd: StartFluentd, start_aggregator: StartAggregator
) -> None:
    messages: list[tuple[str, dict[str, Any]]] = [
        ("raw.web", {"log": "GET /pay 200 ✓", "container_id": "c0ffee"}),
        ("raw.web", {"log": "a line that ends\n"}),
        ("raw.web", {"log": {"nested": [1, "two"]}}),  # Ruby's to_s of a map
        ("raw.web", {"log": 42}),
        ("raw.web", {"message": "no log field: not sent"}),
        ("gz.api", {"log": "GET /q 404", "n": 1}),
        ("gz.api", {"log": "ünïcødé", "nested": {"a": [1, 2]}}),
        ("zl.worker", {"log": "job done", "ms": 12}),
        ("zl.worker", {"log": "job failed", "error": "timeout"}),
    ]
    theirs, ours = run_both(FIXTURES / "kinesis-settings.conf", messages, 8, emulator,
                            fluentd, start_aggregator, read=kinesis_records)  # fmt: skip
    assert ours == theirs, shown(theirs, ours)
    assert sum(ours.values()) == 8


def test_an_assumed_role_delivers_what_the_kinesis_plugin_delivers(
    emulator: EmulatorThread, fluentd: StartFluentd, start_aggregator: StartAggregator,
    moto_server: str,
) -> None:  # fmt: skip
    messages: list[tuple[str, dict[str, Any]]] = [
        ("app.pay", {"log": f"payment {i}", "amount": i * 10}) for i in range(5)
    ]
    theirs, ours = run_both(FIXTURES / "kinesis-role.conf", messages, 5, emulator, fluentd,
                            start_aggregator, STS_ENDPOINT=moto_server)  # fmt: skip
    assert ours == theirs, shown(theirs, ours)
    # both signed with the role's credentials (from moto's STS), never the chain's own key
    keys = emulator.stats()["calls_by_access_key"]
    assert keys and "x" not in keys
