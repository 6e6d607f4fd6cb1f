"""One PutRecordBatch call, and what its outcome means for the lines it carried.

The buffer owns retries, so each call is exactly one HTTP attempt and this module only
classifies: records refused inside a successful call are retried, whole-call errors are either
passing (:class:`RetryableError`) or final (the lines are rejected with the error code as the
reason).

Credentials from the environment or the ECS task role are read by credentials.py; the rest of
the SDKs' chain (profiles, instance metadata...) and ``assume_role`` (a role assumed with those,
as the Kinesis plugin's <assume_role_credentials>) by botocore, loaded only for them;
signing.py signs (SigV4); the endpoint is Firehose's public one for the region unless
``endpoint_url`` (or the SDKs' AWS_ENDPOINT_URL_FIREHOSE / AWS_ENDPOINT_URL) is set;
the request body and the response are handled here, because
botocore's generic JSON serializer and parser cost several microseconds per record, which at
tens of thousands of records a second is most of a core. The wire format is AWS JSON 1.1:
``POST /`` with ``X-Amz-Target: Firehose_20150804.PutRecordBatch``; errors are non-2xx with
``{"__type": code, "message": ...}``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
)

from aggregator.config.model import AssumeRole, FirehoseDestination
from aggregator.metrics import FIREHOSE_FAILED_RECORDS, FIREHOSE_REQUESTS
from aggregator.sinks.base import DELIVERED, RetryableError, WriteResult
from aggregator.sinks.firehose.credentials import from_environment
from aggregator.sinks.firehose.http import HttpClient, HttpError, proxy_for
from aggregator.sinks.firehose.request_builder import Batch
from aggregator.sinks.firehose.signing import Signer

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
    HttpError,
    TimeoutError,  # asyncio.timeout(); the same class as asyncio.TimeoutError since 3.11
    OSError,
)

CREDENTIAL_ERRORS: tuple[type[BaseException], ...] = (
    NoCredentialsError,
    PartialCredentialsError,
    CredentialRetrievalError,
    BotoCoreError,  # STS unreachable (assume_role)
    ClientError,  # STS refused (assume_role: AccessDenied, a wrong external_id)
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


TARGET = "Firehose_20150804.PutRecordBatch"
CONTENT_TYPE = "application/x-amz-json-1.1"


def error_code(status: int, payload: bytes) -> tuple[str, str]:
    """The error code and message of a non-2xx reply, read as botocore reads AWS JSON errors:
    ``__type`` may be prefixed (``ns#Code``) or suffixed (``Code:detail``); without it the code
    is the HTTP status."""
    try:
        body = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    code = str(body.get("__type") or status)
    code = code.split(":", 1)[0].rsplit("#", 1)[-1]
    message = str(body.get("message", body.get("Message", "")))
    return code, message


def default_endpoint(region: str) -> str:
    """Firehose's public endpoint in ``region`` (China regions have their own DNS suffix); any
    other endpoint (FIPS, VPC) is set with ``endpoint_url``."""
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://firehose.{region}.{suffix}"


def configured_endpoint(env: Mapping[str, str] = os.environ) -> str | None:
    """The endpoint the AWS SDKs take from the environment: AWS_ENDPOINT_URL_FIREHOSE, else
    AWS_ENDPOINT_URL, unless AWS_IGNORE_CONFIGURED_ENDPOINT_URLS is true."""
    if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return env.get("AWS_ENDPOINT_URL_FIREHOSE") or env.get("AWS_ENDPOINT_URL") or None


class FirehoseService:
    """PutRecordBatch calls to one delivery stream, over one reused connection pool."""

    def __init__(self, destination: str, settings: FirehoseDestination) -> None:
        self._destination = destination
        self._stream = settings.delivery_stream
        self._settings = settings
        self._timeout = settings.request_timeout
        self._http: HttpClient | None = None
        self._session: Any = None  # botocore's (aiobotocore), made only when it is needed
        self._credentials: Any = None
        self._credentials_worked = False  # whether they have ever given keys
        self._credentials_lock = asyncio.Lock()
        self._url = ""
        self._region = ""
        self._signer: Signer | None = None
        # Bound once: .labels() is a dict lookup under a lock, not free on every call.
        self._ok = FIREHOSE_REQUESTS.labels(destination, "ok")
        self._partial = FIREHOSE_REQUESTS.labels(destination, "partial")
        self._throttled = FIREHOSE_REQUESTS.labels(destination, "throttled")
        self._error = FIREHOSE_REQUESTS.labels(destination, "error")

    async def start(self) -> None:
        settings = self._settings
        # AWS_REGION is what ECS sets and newer SDKs read; botocore reads AWS_DEFAULT_REGION.
        region = (
            settings.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or self._botocore().get_config_variable("region")  # a profile's
        )
        if not region:
            raise ValueError(
                f"destination {self._destination}: no AWS region; set `region` or AWS_REGION"
            )
        # Not a botocore client: its endpoint and service models cost ~20 MiB per worker.
        self._url = settings.endpoint_url or configured_endpoint() or default_endpoint(region)
        self._signer = Signer(self._url, region, CONTENT_TYPE, TARGET)
        self._region = region
        self._http = HttpClient(
            self._url,
            limit=MAX_POOL_CONNECTIONS,
            connect_timeout=min(CONNECT_TIMEOUT, settings.request_timeout),
            cafile=os.environ.get("AWS_CA_BUNDLE") or None,  # as the AWS SDKs read it
            proxy=proxy_for(self._url, settings.http_proxy),
        )
        try:
            await self._resolve_credentials()
        except CREDENTIAL_ERRORS as exc:
            # Not a reason to refuse logs: events are buffered and every flush asks again.
            log.warning(
                "no AWS credentials yet; deliveries will ask the credential chain again",
                extra={"destination": self._destination, "error": str(exc)},
            )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _resolve_credentials(self) -> Any:
        """The standard chain's credentials, asked for again as long as it has given none: at
        start a task-role or instance-metadata endpoint may not answer yet, and a service that
        never asked again would never deliver."""
        async with self._credentials_lock:
            if self._credentials is None:
                role = self._settings.assume_role
                chain = from_environment() if role is None else None
                if chain is None:
                    chain = await self._botocore().get_credentials()
                self._credentials = chain if chain is None or role is None else self._assumed(
                    chain, role)  # fmt: skip
        if self._credentials is None:
            raise NoCredentialsError()
        return self._credentials

    def _botocore(self) -> Any:
        """botocore's session (aiobotocore's), for what credentials.py does not read."""
        if self._session is None:
            from aiobotocore.session import AioSession

            self._session = AioSession()
        return self._session

    def _assumed(self, chain: Any, role: AssumeRole) -> Any:
        """Credentials of ``role``, assumed with ``chain``'s and refreshed ahead of their
        expiry (botocore's refreshable credentials: as the SDKs do it)."""
        from aiobotocore.config import AioConfig
        from aiobotocore.credentials import (
            AioAssumeRoleCredentialFetcher,
            AioDeferredRefreshableCredentials,
        )

        session = self._botocore()
        proxy = role.sts_http_proxy or self._settings.http_proxy
        config = AioConfig(proxies={"http": proxy, "https": proxy}) if proxy else None

        def sts(service: str, **credentials: Any) -> Any:
            return session.create_client(service, region_name=self._region, config=config,
                                         endpoint_url=role.sts_endpoint_url, **credentials)

        extra: dict[str, Any] = {"RoleSessionName": role.role_session_name}
        for key, value in (("ExternalId", role.external_id), ("Policy", role.policy),
                           ("DurationSeconds", role.duration_seconds)):  # fmt: skip
            if value is not None:
                extra[key] = value
        fetcher = AioAssumeRoleCredentialFetcher(sts, chain, role.role_arn, extra_args=extra)
        return AioDeferredRefreshableCredentials(fetcher.fetch_credentials, "assume-role")

    async def _signed_headers(self, body: bytes) -> dict[str, str]:
        credentials = await self._resolve_credentials()
        try:
            # Refreshes the task role's credentials ahead of their expiry.
            frozen = await credentials.get_frozen_credentials()
        except CREDENTIAL_ERRORS:
            if not self._credentials_worked:
                # A source that has never given keys (a task-role endpoint not answering yet):
                # the next call looks at the whole chain again.
                self._credentials = None
            raise
        self._credentials_worked = True
        assert self._signer is not None
        return self._signer.headers(body, frozen.access_key, frozen.secret_key, frozen.token)

    async def put_batch(self, batch: Batch) -> WriteResult:
        """Send ``batch`` once. Returns :data:`DELIVERED`, the lines of refused records in
        ``retry``, or every line ``rejected``; raises :class:`RetryableError` when the whole call
        failed for a passing reason."""
        if self._http is None:
            raise RuntimeError("FirehoseService.put_batch() before start()")
        body = batch.body(self._stream)
        try:
            headers = await self._signed_headers(body)
            async with asyncio.timeout(self._timeout):
                status, payload = await self._http.post(headers, body)
        except NETWORK_ERRORS as exc:
            self._error.inc()
            raise RetryableError("network", f"{self._destination}: {exc!r}") from exc
        except CREDENTIAL_ERRORS as exc:
            self._error.inc()
            raise RetryableError("credentials", f"{self._destination}: {exc}") from exc
        if status != 200:
            return self._whole_call_failed(status, payload, batch)
        try:
            reply = orjson.loads(payload)
            failed = reply.get("FailedPutCount")
        except (orjson.JSONDecodeError, AttributeError) as exc:
            # The call may have gone through: retrying risks duplicates, not losing events.
            self._error.inc()
            raise RetryableError("bad_response", f"{self._destination}: {exc}") from exc
        if not failed:
            self._ok.inc()
            return DELIVERED
        self._partial.inc()
        return WriteResult(retry=self._refused_lines(batch, reply.get("RequestResponses") or []))

    def _refused_lines(self, batch: Batch, responses: list[dict[str, Any]]) -> list[bytes]:
        # Responses are positional. A record without a response (a truncated reply) cannot be
        # known delivered, so it is retried: a duplicate beats a silent loss.
        retry: list[bytes] = []
        codes: dict[str, int] = {}
        n_responses = len(responses)
        records = batch.records
        for i in range(len(records)):
            code = responses[i].get("ErrorCode") if i < n_responses else "MissingResponse"
            if code:
                retry.extend(records.lines_of(i))
                codes[code] = codes.get(code, 0) + 1
        for code, count in codes.items():
            FIREHOSE_FAILED_RECORDS.labels(self._destination, code).inc(count)
        return retry

    def _whole_call_failed(self, status: int, payload: bytes, batch: Batch) -> WriteResult:
        code, text = error_code(status, payload)
        kind = classify_client_error(code, status)
        message = f"{self._destination}: PutRecordBatch {code}: {text}"
        if kind.retryable:
            (self._throttled if kind.throttled else self._error).inc()
            raise RetryableError(kind.reason, message)
        self._error.inc()
        # Only the sink sees the service's message; the buffer logs and counts the lines.
        log.error("%s; %d records refused", message, len(batch.records))
        result = WriteResult()
        result.reject(kind.reason, batch.lines())
        return result
