"""One PutRecordBatch call against the emulator, and the classification of its outcome."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from aggregator.config.model import FirehoseDestination
from aggregator.metrics import REGISTRY
from aggregator.sinks.base import DELIVERED, RetryableError, WriteResult
from aggregator.sinks.firehose.record import Records
from aggregator.sinks.firehose.request_builder import Batch, build_batches
from aggregator.sinks.firehose.service import (
    FirehoseService,
    classify_client_error,
    snake_case,
)
from emulator import EmulatorThread
from tests.sinks.firehose.support import firehose_settings as settings


def batch_of(lines: list[bytes]) -> Batch:
    (batch,) = build_batches(Records(lines))
    return batch


def requests_count(destination: str, outcome: str) -> float:
    labels = {"destination": destination, "outcome": outcome}
    return REGISTRY.get_sample_value("aggregator_firehose_requests_total", labels) or 0.0


def put(destination: str, config: FirehoseDestination, batch: Batch) -> WriteResult:
    async def go() -> WriteResult:
        service = FirehoseService(destination, config)
        await service.start()
        try:
            return await service.put_batch(batch)
        finally:
            await service.close()

    return asyncio.run(go())


LINES = [b'{"n":%d}\n' % i for i in range(300)]


# --- classification (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("ServiceUnavailableException", "service_unavailable"),
        ("InvalidArgumentException", "invalid_argument"),
        ("ResourceNotFoundException", "resource_not_found"),
        ("AccessDeniedException", "access_denied"),
        ("InvalidKMSResourceException", "invalid_kms_resource"),
        ("InternalFailure", "internal_failure"),
        ("RequestTimeout", "request_timeout"),
        ("UnrecognizedClientException", "unrecognized_client"),
    ],
)
def test_snake_case_reasons(code: str, reason: str) -> None:
    assert snake_case(code) == reason


@pytest.mark.parametrize(
    ("code", "status", "retryable", "throttled", "reason"),
    [
        ("ServiceUnavailableException", 400, True, True, "service_unavailable"),
        ("ThrottlingException", 400, True, True, "throttling"),
        ("LimitExceededException", 400, True, True, "limit_exceeded"),
        ("InternalFailure", 500, True, False, "internal_failure"),
        ("InternalFailureException", 500, True, False, "internal_failure"),
        ("RequestTimeout", 408, True, False, "request_timeout"),
        ("500", 500, True, False, "http_500"),
        ("", 503, True, False, "http_503"),
        ("SomethingNew", 502, True, False, "something_new"),
        ("InvalidArgumentException", 400, False, False, "invalid_argument"),
        ("ResourceNotFoundException", 400, False, False, "resource_not_found"),
        ("AccessDeniedException", 400, False, False, "access_denied"),
        ("UnrecognizedClientException", 400, False, False, "unrecognized_client"),
        ("InvalidSignatureException", 400, False, False, "invalid_signature"),
        ("ValidationException", 400, False, False, "validation"),
        ("InvalidKMSResourceException", 400, False, False, "invalid_kms_resource"),
        ("SomethingElse", 403, False, False, "something_else"),
    ],
)
def test_whole_call_error_classification(
    code: str, status: int, retryable: bool, throttled: bool, reason: str
) -> None:
    assert classify_client_error(code, status) == (retryable, throttled, reason)


# --- against the emulator --------------------------------------------------------------------


def test_accepted_batch_is_delivered(emulator: EmulatorThread) -> None:
    before = requests_count("svc-ok", "ok")
    result = put("svc-ok", settings(emulator.endpoint_url), batch_of(LINES))
    assert result is DELIVERED
    assert emulator.records("events") == LINES
    assert requests_count("svc-ok", "ok") == before + 1


def test_partial_failure_retries_exactly_the_failed_lines(emulator: EmulatorThread) -> None:
    emulator.configure(fail_rate=0.3)
    failed_metric = "aggregator_firehose_failed_records_total"
    labels = {"destination": "svc-partial", "error_code": "ServiceUnavailableException"}
    before = REGISTRY.get_sample_value(failed_metric, labels) or 0.0

    result = put("svc-partial", settings(emulator.endpoint_url), batch_of(LINES))

    accepted = emulator.records("events")
    assert 0 < len(result.retry) < len(LINES)
    assert result.retry == [x for x in LINES if x not in set(accepted)]
    assert sorted(accepted + result.retry) == sorted(LINES)
    assert result.rejected == {}
    assert REGISTRY.get_sample_value(failed_metric, labels) == before + len(result.retry)
    assert requests_count("svc-partial", "partial") >= 1


def test_aggregated_record_failure_retries_all_its_lines(emulator: EmulatorThread) -> None:
    emulator.configure(fail_rate=1.0)
    batch = build_batches(Records([b"".join(LINES[:5]), LINES[5]], [LINES[:5], LINES[5:6]]))
    result = put("svc-agg", settings(emulator.endpoint_url), batch[0])
    assert result.retry == LINES[:6]


def test_throttled_call_raises_retryable(emulator: EmulatorThread) -> None:
    emulator.configure(throttle_rate=1.0)
    before = requests_count("svc-throttle", "throttled")
    with pytest.raises(RetryableError) as caught:
        put("svc-throttle", settings(emulator.endpoint_url), batch_of(LINES))
    assert caught.value.reason == "service_unavailable"
    assert emulator.records("events") == []
    assert emulator.stats()["calls"] == 1  # botocore made no retry of its own
    assert requests_count("svc-throttle", "throttled") == before + 1


def test_unknown_stream_rejects_every_line() -> None:
    with EmulatorThread(streams={"known"}) as emu:
        result = put("svc-404", settings(emu.endpoint_url, stream="unknown"), batch_of(LINES))
    assert result.retry == []
    assert result.rejected == {"resource_not_found": LINES}


def test_request_over_the_limits_is_rejected_not_retried(emulator: EmulatorThread) -> None:
    too_many = Batch(Records([b"x\n"] * 501), 1002)
    result = put("svc-invalid", settings(emulator.endpoint_url), too_many)
    assert list(result.rejected) == ["validation"]
    assert len(result.rejected["validation"]) == 501


def test_stalled_service_times_out_as_network(emulator: EmulatorThread) -> None:
    emulator.stall()
    before = requests_count("svc-stall", "error")
    with pytest.raises(RetryableError) as caught:
        put("svc-stall", settings(emulator.endpoint_url, request_timeout=0.3), batch_of(LINES))
    assert caught.value.reason == "network"
    assert requests_count("svc-stall", "error") == before + 1
    assert emulator.stats()["calls"] == 1


def test_refused_connection_is_network() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the call: nothing listens there
    with pytest.raises(RetryableError) as caught:
        put("svc-refused", settings(f"http://127.0.0.1:{port}"), batch_of(LINES))
    assert caught.value.reason == "network"


def test_credentials_that_appear_after_start_are_used(
    emulator: EmulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At start the chain has nothing: no keys, and a container-credentials endpoint (the ECS
    # task role's) that does not answer yet. The sink starts anyway and asks again per call.
    access_key, secret_key = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{port}/creds")

    async def go() -> None:
        service = FirehoseService("svc-creds", settings(emulator.endpoint_url))
        await service.start()
        try:
            monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI")
            with pytest.raises(RetryableError) as caught:
                await service.put_batch(batch_of(LINES))
            assert caught.value.reason == "credentials"
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
            assert await service.put_batch(batch_of(LINES)) is DELIVERED
        finally:
            await service.close()

    asyncio.run(go())
    assert emulator.records("events") == LINES


def test_put_before_start_is_a_bug(emulator: EmulatorThread) -> None:
    service = FirehoseService("svc-early", settings(emulator.endpoint_url))
    with pytest.raises(RuntimeError):
        asyncio.run(service.put_batch(batch_of(LINES)))


def test_default_endpoints() -> None:
    from aggregator.sinks.firehose.service import default_endpoint

    assert default_endpoint("us-west-2") == "https://firehose.us-west-2.amazonaws.com"
    assert default_endpoint("cn-north-1") == "https://firehose.cn-north-1.amazonaws.com.cn"


def test_the_sdks_endpoint_variables_are_honoured() -> None:
    from aggregator.sinks.firehose.service import configured_endpoint

    assert configured_endpoint({}) is None
    assert configured_endpoint({"AWS_ENDPOINT_URL": "http://all"}) == "http://all"
    both = {"AWS_ENDPOINT_URL": "http://all", "AWS_ENDPOINT_URL_FIREHOSE": "http://fh"}
    assert configured_endpoint(both) == "http://fh"
    assert configured_endpoint({**both, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}) is None


def test_an_assumed_role_delivers_and_its_credentials_are_refreshed_before_expiry(
    emulator: EmulatorThread, moto_server: str
) -> None:
    """moto's STS, reached through a proxy (sts_http_proxy), gives 15-minute credentials: that
    is inside botocore's refresh window from the start, so each call refreshes them, as the
    SDKs do ahead of an expiry."""
    from tests.sinks.firehose.test_http import Proxy

    async def go() -> list[str]:
        proxy = Proxy()
        proxying = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        proxy_url = f"http://127.0.0.1:{proxying.sockets[0].getsockname()[1]}"
        role = {"role_arn": "arn:aws:iam::210987654321:role/central-logging",
                "role_session_name": "aggregator-test", "external_id": "x-42",
                "duration_seconds": 900, "sts_endpoint_url": moto_server,
                "sts_http_proxy": proxy_url}  # fmt: skip
        service = FirehoseService("assumed", settings(emulator.endpoint_url, assume_role=role))
        await service.start()
        try:
            for _ in range(3):
                assert await service.put_batch(batch_of(LINES[:5])) is DELIVERED
        finally:
            await service.close()
            proxying.close()
        return [b"".join(proxy.sent).decode(errors="replace")]

    (sts_traffic,) = asyncio.run(go())
    keys = emulator.stats()["calls_by_access_key"]
    assert "testing" not in keys  # the chain's own key only asks STS
    assert len(keys) >= 2 and sum(keys.values()) == 3  # fresh credentials, then fresher
    assert sts_traffic.count("Action=AssumeRole") >= 2
    assert "ExternalId=x-42" in sts_traffic and "DurationSeconds=900" in sts_traffic
    assert "RoleArn=arn%3Aaws%3Aiam%3A%3A210987654321%3Arole%2Fcentral-logging" in sts_traffic
