"""The Firehose emulator, driven by plain botocore/aiobotocore clients as the sink's would be."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiobotocore.session import AioSession
from botocore.config import Config
from botocore.exceptions import ClientError

import aggregator
from emulator import EmulatorThread, FirehoseEmulator

ONE_ATTEMPT = Config(retries={"total_max_attempts": 1}, read_timeout=5, connect_timeout=2)


def client(emu: EmulatorThread) -> Any:
    return boto3.client(
        "firehose", endpoint_url=emu.endpoint_url, region_name="us-east-1", config=ONE_ATTEMPT
    )


def records(n: int) -> list[dict[str, bytes]]:
    return [{"Data": b'{"n":%d}\n' % i} for i in range(n)]


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def http(emu: EmulatorThread, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        emu.endpoint_url + path, data=data, method="POST" if data else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_accepts_and_counts_records(emulator: EmulatorThread) -> None:
    reply = client(emulator).put_record_batch(DeliveryStreamName="s1", Records=records(10))
    assert reply["FailedPutCount"] == 0
    assert reply["Encrypted"] is False
    assert len(reply["RequestResponses"]) == 10
    assert all("RecordId" in r for r in reply["RequestResponses"])
    assert emulator.records("s1") == [r["Data"] for r in records(10)]
    assert emulator.records("other") == []
    stats = emulator.stats()
    assert stats["calls"] == 1
    assert stats["accepted_records"] == 10
    assert stats["accepted_bytes"] == sum(len(r["Data"]) for r in records(10))
    assert stats["accepted_by_stream"] == {"s1": 10}
    assert stats["failed_records"] == stats["throttled_calls"] == 0


def test_lines_split_aggregated_records(emulator: EmulatorThread) -> None:
    client(emulator).put_record_batch(
        DeliveryStreamName="s", Records=[{"Data": b"a\nb\n"}, {"Data": b"c\n"}]
    )
    assert emulator.lines("s") == [b"a\n", b"b\n", b"c\n"]
    assert emulator.wait_for_lines("s", 3, timeout=1) == [b"a\n", b"b\n", b"c\n"]
    with pytest.raises(TimeoutError):
        emulator.wait_for_lines("s", 4, timeout=0.1)


def test_per_record_failures(emulator: EmulatorThread) -> None:
    emulator.configure(fail_rate=1.0)
    reply = client(emulator).put_record_batch(DeliveryStreamName="s", Records=records(5))
    assert reply["FailedPutCount"] == 5
    assert {r["ErrorCode"] for r in reply["RequestResponses"]} == {"ServiceUnavailableException"}
    assert emulator.records("s") == []
    assert emulator.stats()["failed_records"] == 5


def test_seeded_failures_are_reproducible() -> None:
    def pattern() -> list[bool]:
        with EmulatorThread(fail_rate=0.5, seed=7) as emu:
            reply = client(emu).put_record_batch(DeliveryStreamName="s", Records=records(50))
            return ["ErrorCode" in r for r in reply["RequestResponses"]]

    first = pattern()
    assert first == pattern()
    assert 0 < sum(first) < 50


def test_throttled_call(emulator: EmulatorThread) -> None:
    emulator.configure(throttle_rate=1.0)
    with pytest.raises(ClientError) as caught:
        client(emulator).put_record_batch(DeliveryStreamName="s", Records=records(3))
    assert error_code(caught) == "ServiceUnavailableException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert caught.value.response["Error"]["Message"] == "Slow down."
    assert emulator.stats()["throttled_calls"] == 1
    assert emulator.records("s") == []


def test_configured_streams_refuse_unknown_names() -> None:
    with EmulatorThread(streams=["known"]) as emu:
        c = client(emu)
        c.put_record_batch(DeliveryStreamName="known", Records=records(1))
        with pytest.raises(ClientError) as caught:
            c.put_record_batch(DeliveryStreamName="unknown", Records=records(1))
        assert error_code(caught) == "ResourceNotFoundException"


def test_streams_can_be_changed_at_run_time(emulator: EmulatorThread) -> None:
    c = client(emulator)
    assert emulator.configure(streams=["a"])["streams"] == ["a"]
    with pytest.raises(ClientError) as caught:
        c.put_record_batch(DeliveryStreamName="b", Records=records(1))
    assert error_code(caught) == "ResourceNotFoundException"
    assert http(emulator, "/_emulator/config", {"streams": ["a", "b"]})[0] == 200
    c.put_record_batch(DeliveryStreamName="b", Records=records(1))
    assert http(emulator, "/_emulator/config", {"streams": "b"})[0] == 400
    emulator.configure(streams=None)
    c.put_record_batch(DeliveryStreamName="c", Records=records(1))
    assert emulator.stats()["accepted_by_stream"] == {"b": 1, "c": 1}


def test_unknown_operation(emulator: EmulatorThread) -> None:
    with pytest.raises(ClientError) as caught:
        client(emulator).describe_delivery_stream(DeliveryStreamName="s")
    assert error_code(caught) == "UnknownOperationException"


def test_firehose_limits_are_enforced(emulator: EmulatorThread) -> None:
    c = client(emulator)
    with pytest.raises(ClientError) as caught:
        c.put_record_batch(DeliveryStreamName="s", Records=records(501))
    assert error_code(caught) == "ValidationException"
    with pytest.raises(ClientError) as caught:
        c.put_record_batch(DeliveryStreamName="s", Records=[{"Data": b"x" * (1000 * 1024 + 1)}])
    assert error_code(caught) == "InvalidArgumentException"
    with pytest.raises(ClientError) as caught:
        c.put_record_batch(DeliveryStreamName="s", Records=[{"Data": b"x" * 1000 * 1024}] * 5)
    assert error_code(caught) == "InvalidArgumentException"
    assert emulator.stats()["accepted_records"] == 0


def test_latency(emulator: EmulatorThread) -> None:
    c = client(emulator)
    c.put_record_batch(DeliveryStreamName="s", Records=records(1))  # connect outside the timing
    emulator.configure(latency=0.2)
    started = time.monotonic()
    c.put_record_batch(DeliveryStreamName="s", Records=records(1))
    assert time.monotonic() - started >= 0.19  # sleep may wake within clock resolution


def test_stall_holds_calls_until_resumed(emulator: EmulatorThread) -> None:
    emulator.stall()
    done = threading.Event()

    def call() -> None:
        client(emulator).put_record_batch(DeliveryStreamName="s", Records=records(2))
        done.set()

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    assert not done.wait(0.3)
    assert emulator.stats()["stalled"] is True
    emulator.resume()
    assert done.wait(5)
    assert len(emulator.records("s")) == 2


def test_keep_records_off_only_counts() -> None:
    with EmulatorThread(keep_records=False) as emu:
        client(emu).put_record_batch(DeliveryStreamName="s", Records=records(4))
        assert emu.records("s") == []
        assert emu.stats()["accepted_records"] == 4
        assert http(emu, "/_emulator/records/s")[0] == 409


def test_reset_forgets_records_and_counters(emulator: EmulatorThread) -> None:
    client(emulator).put_record_batch(DeliveryStreamName="s", Records=records(4))
    emulator.reset()
    assert emulator.records("s") == []
    assert emulator.stats()["calls"] == 0


def test_http_stats_config_reset_and_records(emulator: EmulatorThread) -> None:
    c = client(emulator)
    c.put_record_batch(DeliveryStreamName="s", Records=records(3))
    status, body = http(emulator, "/_emulator/stats")
    assert status == 200
    assert json.loads(body)["accepted_records"] == 3
    assert http(emulator, "/_emulator/records/s") == (200, b'{"n":0}\n{"n":1}\n{"n":2}\n')

    status, body = http(emulator, "/_emulator/config", {"fail_rate": 1, "latency": 0.01})
    assert status == 200
    assert json.loads(body) == {
        "fail_rate": 1.0,
        "throttle_rate": 0.0,
        "latency": 0.01,
        "lose_records": 0,
        "stalled": False,
        "streams": None,
    }
    assert c.put_record_batch(DeliveryStreamName="s", Records=records(2))["FailedPutCount"] == 2

    assert http(emulator, "/_emulator/config", {"fail_rate": 2})[0] == 400
    assert http(emulator, "/_emulator/config", {"nonsense": 1})[0] == 400
    assert http(emulator, "/_emulator/config", [1])[0] == 400

    assert http(emulator, "/_emulator/config", {"stalled": True})[0] == 200
    assert emulator.stats()["stalled"] is True
    http(emulator, "/_emulator/config", {"stalled": False, "fail_rate": 0})

    assert http(emulator, "/_emulator/reset", {})[0] == 200
    assert emulator.stats()["calls"] == 0


def test_in_process_with_aiobotocore() -> None:
    async def go() -> None:
        emulator = FirehoseEmulator(seed=1)
        await emulator.start()
        try:
            async with AioSession().create_client(
                "firehose", region_name="us-east-1", endpoint_url=emulator.endpoint_url
            ) as c:
                reply = await c.put_record_batch(DeliveryStreamName="s", Records=records(3))
            assert reply["FailedPutCount"] == 0
            assert emulator.records["s"] == [r["Data"] for r in records(3)]
            assert emulator.accepted_records == 3
        finally:
            await emulator.stop()

    asyncio.run(go())


def test_command_line() -> None:
    root = str(Path(aggregator.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emulator",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--fail-rate",
            "0.5",
            "--seed",
            "3",
        ],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ")
        with urllib.request.urlopen(url + "/_emulator/stats", timeout=5) as response:
            assert json.loads(response.read())["fail_rate"] == 0.5
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_accepted_events_count_lines_of_aggregated_records(emulator: EmulatorThread) -> None:
    client(emulator).put_record_batch(
        DeliveryStreamName="s", Records=[{"Data": b"a\nb\nc\n"}, {"Data": b"d\n"}]
    )
    stats = emulator.stats()
    assert stats["accepted_records"] == 2
    assert stats["accepted_events"] == 4
    emulator.reset()
    assert emulator.stats()["accepted_events"] == 0


def test_on_accept_sees_only_accepted_data() -> None:
    seen: list[tuple[str, list[bytes]]] = []
    with EmulatorThread(
        keep_records=False, fail_rate=0.5, seed=5, on_accept=lambda s, d: seen.append((s, d))
    ) as emu:
        reply = client(emu).put_record_batch(DeliveryStreamName="s", Records=records(40))
        ok = [
            r["Data"]
            for r, answer in zip(records(40), reply["RequestResponses"], strict=True)
            if "RecordId" in answer
        ]
        assert 0 < len(ok) < 40
        assert seen == [("s", ok)]
        assert emu.stats()["accepted_events"] == len(ok)


def test_lose_records_answers_success_but_discards(emulator: EmulatorThread) -> None:
    assert emulator.configure(lose_records=2)["lose_records"] == 2
    reply = client(emulator).put_record_batch(DeliveryStreamName="s", Records=records(5))
    assert reply["FailedPutCount"] == 0
    assert all("RecordId" in r for r in reply["RequestResponses"])
    assert emulator.records("s") == [r["Data"] for r in records(5)[2:]]
    stats = emulator.stats()
    assert (stats["accepted_records"], stats["accepted_events"], stats["lost_records"]) == (3, 3, 2)
    assert stats["lose_records"] == 0
    assert http(emulator, "/_emulator/config", {"lose_records": 1})[0] == 200
    client(emulator).put_record_batch(DeliveryStreamName="s", Records=records(1))
    assert emulator.stats()["lost_records"] == 3
    for bad in (-1, 1.5, True, "2"):
        assert http(emulator, "/_emulator/config", {"lose_records": bad})[0] == 400


def test_command_line_lose_records() -> None:
    from emulator.__main__ import build_parser, emulator_options

    options = emulator_options(build_parser().parse_args(["--lose-records", "3"]))
    assert FirehoseEmulator(**options).lose_records == 3
