"""One PutRecordBatch call, and what its outcome means for the lines it carried.

The buffer owns retries, so the client makes exactly one HTTP attempt and this module only
classifies: records refused inside a successful call are retried, whole-call errors are either
passing (:class:`RetryableError`) or final (the lines are rejected with the error code as the
reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any, NamedTuple

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotocoreConnectionError

from aggregator.config.model import FirehoseDestination
from aggregator.metrics import FIREHOSE_FAILED_RECORDS, FIREHOSE_REQUESTS
from aggregator.sinks.base import DELIVERED, RetryableError, WriteResult
from aggregator.sinks.firehose.request_builder import Batch

log = logging.getLogger(__name__)

THROTTLING_CODES = frozenset(
    {
        "ServiceUnavailableException",  # Firehose's own "slow down"
        "ThrottlingException",
        "LimitExceededException",
        "ThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
    }
)
"""Whole-call codes that mean "too fast": retryable, and counted as outcome=throttled."""

TRANSIENT_CODES = THROTTLING_CODES | {
    "InternalFailure",
    "InternalFailureException",
    "InternalServerError",
    "ServiceFailure",
    "RequestTimeout",
    "RequestTimeoutException",
    # Credentials from the standard chain (task role) are refreshed ahead of expiry; an
    # expired token is a race with that refresh, not a configuration error.
    "ExpiredTokenException",
    "ExpiredToken",
}
"""Whole-call codes that may pass whatever the HTTP status says."""

NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    HTTPClientError,  # includes ConnectionClosedError, ReadTimeoutError
    BotocoreConnectionError,  # includes EndpointConnectionError, ConnectTimeoutError
    IncompleteReadError,
    aiohttp.ClientError,
    TimeoutError,  # asyncio.timeout(); the same class as asyncio.TimeoutError since 3.11
    OSError,
)

CREDENTIAL_ERRORS: tuple[type[BaseException], ...] = (
    NoCredentialsError,
    PartialCredentialsError,
    CredentialRetrievalError,
)
"""The credential chain failed to produce credentials: on Fargate that is the task-role
endpoint being briefly unreachable more often than a missing role, so it is retried (a lasting
misconfiguration still ends in the secondary once the buffer's retry limits run out)."""

MAX_POOL_CONNECTIONS = 32
"""Connections kept to Firehose per sink: a chunk's batches are sent concurrently and several
chunks are in flight (``flush_thread_count``), so the pool must not serialise them."""

CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection (capped by ``request_timeout``): an endpoint that cannot be
reached should fail fast and be retried by the buffer."""

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


class ErrorClass(NamedTuple):
    """How a whole-call error is handled."""

    retryable: bool
    throttled: bool
    reason: str


def snake_case(code: str) -> str:
    """``ServiceUnavailableException`` → ``service_unavailable``, ``InvalidKMSResourceException``
    → ``invalid_kms_resource``: a stable, readable reason label."""
    if code.endswith("Exception") and code != "Exception":
        code = code[: -len("Exception")]
    return _CAMEL_BOUNDARY.sub("_", code).lower()


def classify_client_error(code: str, status: int) -> ErrorClass:
    """Throttling, service failures and any 5xx may pass; anything else (bad argument, unknown
    stream, access denied, other 4xx) will fail the same way again."""
    reason = snake_case(code) if code and not code.isdigit() else f"http_{status}"
    throttled = code in THROTTLING_CODES or status == 429
    retryable = throttled or code in TRANSIENT_CODES or status >= 500
    return ErrorClass(retryable, throttled, reason)


class FirehoseService:
    """PutRecordBatch calls to one delivery stream, over one reused client."""

    def __init__(self, destination: str, settings: FirehoseDestination) -> None:
        self._destination = destination
        self._stream = settings.delivery_stream
        self._settings = settings
        self._timeout = settings.request_timeout
        self._client: Any = None
        self._exit = contextlib.AsyncExitStack()
        # Bound once: .labels() is a dict lookup under a lock, not free on every call.
        self._ok = FIREHOSE_REQUESTS.labels(destination, "ok")
        self._partial = FIREHOSE_REQUESTS.labels(destination, "partial")
        self._throttled = FIREHOSE_REQUESTS.labels(destination, "throttled")
        self._error = FIREHOSE_REQUESTS.labels(destination, "error")

    async def start(self) -> None:
        settings = self._settings
        config = AioConfig(
            # The Records list is built here and always valid; validating it walks every record.
            parameter_validation=False,
            # One attempt: the buffer decides when and whether to try again.
            retries={"total_max_attempts": 1},
            read_timeout=settings.request_timeout,
            connect_timeout=min(CONNECT_TIMEOUT, settings.request_timeout),
            max_pool_connections=MAX_POOL_CONNECTIONS,
        )
        self._client = await self._exit.enter_async_context(
            AioSession().create_client(
                "firehose",
                region_name=settings.region,
                endpoint_url=settings.endpoint_url,
                config=config,
            )
        )

    async def close(self) -> None:
        await self._exit.aclose()
        self._client = None

    async def put_batch(self, batch: Batch) -> WriteResult:
        """Send ``batch`` once. Returns :data:`DELIVERED`, the lines of refused records in
        ``retry``, or every line ``rejected``; raises :class:`RetryableError` when the whole call
        failed for a passing reason."""
        if self._client is None:
            raise RuntimeError("FirehoseService.put_batch() before start()")
        try:
            # read_timeout bounds each socket read; this bounds the call as a whole.
            async with asyncio.timeout(self._timeout):
                response = await self._client.put_record_batch(
                    DeliveryStreamName=self._stream, Records=batch.entries()
                )
        except ClientError as exc:
            return self._whole_call_failed(exc, batch)
        except NETWORK_ERRORS as exc:
            self._error.inc()
            raise RetryableError("network", f"{self._destination}: {exc!r}") from exc
        except CREDENTIAL_ERRORS as exc:
            self._error.inc()
            raise RetryableError("credentials", f"{self._destination}: {exc}") from exc
        if not response.get("FailedPutCount"):
            self._ok.inc()
            return DELIVERED
        self._partial.inc()
        return WriteResult(retry=self._refused_lines(batch, response.get("RequestResponses", [])))

    def _refused_lines(self, batch: Batch, responses: list[dict[str, Any]]) -> list[bytes]:
        # Responses are positional. A record without a response (a truncated reply) cannot be
        # known delivered, so it is retried: a duplicate beats a silent loss.
        retry: list[bytes] = []
        codes: dict[str, int] = {}
        n_responses = len(responses)
        for i, record in enumerate(batch.records):
            code = responses[i].get("ErrorCode") if i < n_responses else "MissingResponse"
            if code:
                retry.extend(record.lines)
                codes[code] = codes.get(code, 0) + 1
        for code, count in codes.items():
            FIREHOSE_FAILED_RECORDS.labels(self._destination, code).inc(count)
        return retry

    def _whole_call_failed(self, exc: ClientError, batch: Batch) -> WriteResult:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        kind = classify_client_error(code, status)
        message = f"{self._destination}: PutRecordBatch {code or status}: {error.get('Message')}"
        if kind.retryable:
            (self._throttled if kind.throttled else self._error).inc()
            raise RetryableError(kind.reason, message) from exc
        self._error.inc()
        # Only the sink sees the service's message; the buffer logs and counts the lines.
        log.error("%s; %d records refused", message, len(batch.records))
        result = WriteResult()
        result.reject(kind.reason, batch.lines())
        return result
