"""A fake Kinesis Data Firehose speaking PutRecordBatch as botocore sends it, with faults.

Firehose's JSON 1.1 protocol: ``POST /`` with ``X-Amz-Target: Firehose_20150804.<Operation>``
and a JSON body; errors are HTTP 400 with ``{"__type": code, "message": ...}``, which botocore
turns into ``ClientError`` with that code. Signatures are not checked.

Faults are plain attributes, changed at any time from the event loop (or through
:class:`EmulatorThread`, or ``POST /_emulator/config`` from another process).

Counting stays cheap so that the emulator is never what a benchmark measures: with
``keep_records=False`` an accepted record costs its base64 decode, a ``len`` and a newline count,
all in C. Whoever needs more (a benchmark sampling latency) passes an ``on_accept`` hook.
"""

from __future__ import annotations

import asyncio
import binascii
import random
import re
import threading
import time
from base64 import b64decode
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Future
from itertools import repeat
from types import TracebackType
from typing import Any, TypeVar

import orjson
from aiohttp import web

TARGET_PREFIX = "Firehose_20150804."
CONTENT_TYPE = "application/x-amz-json-1.1"
MAX_RECORDS = 500
MAX_RECORD_BYTES = 1_000 * 1024
MAX_REQUEST_BYTES = 4 * 1024 * 1024
FAULT_FIELDS = ("fail_rate", "throttle_rate", "latency")
SETTINGS = (*FAULT_FIELDS, "lose_records", "stalled", "streams")

T = TypeVar("T")

AcceptHook = Callable[[str, list[bytes]], None]
"""Called on the event loop with a stream name and the data of the records just accepted on it
(after base64 decoding), before the reply is sent. It must be quick; an exception fails the
call with HTTP 500 and its records are not counted as accepted."""


_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


class _ApiError(Exception):
    """An error reply in the JSON protocol's shape."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FirehoseEmulator:
    """The emulator: its faults, what it accepted, and the aiohttp server answering for it."""

    def __init__(
        self,
        *,
        fail_rate: float = 0.0,
        throttle_rate: float = 0.0,
        latency: float = 0.0,
        streams: Iterable[str] | None = None,
        keep_records: bool = True,
        seed: int | None = None,
        lose_records: int = 0,
        on_accept: AcceptHook | None = None,
    ) -> None:
        self.fail_rate = fail_rate
        """Probability that each record fails on its own (ErrorCode ServiceUnavailableException)."""
        self.throttle_rate = throttle_rate
        """Probability that a whole call is refused with ServiceUnavailableException."""
        self.latency = latency
        """Seconds added to every call."""
        self.streams: frozenset[str] | None = None if streams is None else frozenset(streams)
        """Known delivery streams; None accepts any name."""
        self.lose_records = _count(lose_records, "lose_records")
        """The next this many records are answered as successful and then discarded, as by a
        sink that loses data (never counted as accepted, only in ``lost_records``)."""
        self.keep_records = keep_records
        self.on_accept = on_accept
        self.random = random.Random(seed)
        self.records: dict[str, list[bytes]] = {}
        """Every accepted record's data, by stream (when ``keep_records``)."""
        self._flowing: asyncio.Event | None = None  # created on the server's loop
        self._stalled = False
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._next_id = 0
        self.reset()

    # --- counters --------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget accepted records and zero the counters (faults are kept)."""
        self.calls = 0
        self.throttled_calls = 0
        self.failed_records = 0
        self.accepted_records = 0
        self.accepted_bytes = 0
        self.accepted_events = 0
        """Newline-terminated lines in accepted data: events, whether records are aggregated."""
        self.lost_records = 0
        self.accepted_by_stream: dict[str, int] = {}
        self.calls_by_access_key: dict[str, int] = {}
        """Calls by the access key id their signature names (signatures are not checked):
        which credentials a client used, e.g. assumed and refreshed ones."""
        self.records = {}

    def stats(self) -> dict[str, Any]:
        """Counters and current faults, as ``GET /_emulator/stats`` returns them."""
        return {
            "calls": self.calls,
            "throttled_calls": self.throttled_calls,
            "failed_records": self.failed_records,
            "accepted_records": self.accepted_records,
            "accepted_bytes": self.accepted_bytes,
            "accepted_events": self.accepted_events,
            "lost_records": self.lost_records,
            "accepted_by_stream": dict(self.accepted_by_stream),
            "calls_by_access_key": dict(self.calls_by_access_key),
            **self.config(),
        }

    def config(self) -> dict[str, Any]:
        return {
            "fail_rate": self.fail_rate,
            "throttle_rate": self.throttle_rate,
            "latency": self.latency,
            "lose_records": self.lose_records,
            "stalled": self._stalled,
            "streams": None if self.streams is None else sorted(self.streams),
        }

    # --- faults ----------------------------------------------------------------------------

    def stall(self) -> None:
        """Hold every call (new and in flight) until :meth:`resume`."""
        self._stalled = True
        if self._flowing is not None:
            self._flowing.clear()

    def resume(self) -> None:
        self._stalled = False
        if self._flowing is not None:
            self._flowing.set()

    @property
    def stalled(self) -> bool:
        return self._stalled

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change any of fail_rate, throttle_rate, latency (numbers), lose_records (a count),
        stalled (bool) and streams (a list of known stream names, or None to accept any)."""
        unknown = set(changes) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown emulator settings: {', '.join(sorted(unknown))}")
        for name in FAULT_FIELDS:
            if name in changes:
                value = float(changes[name])
                if value < 0 or (name != "latency" and value > 1):
                    raise ValueError(f"{name} out of range: {value}")
                setattr(self, name, value)
        if "lose_records" in changes:
            self.lose_records = _count(changes["lose_records"], "lose_records")
        if "streams" in changes:
            streams = changes["streams"]
            if streams is not None and (
                isinstance(streams, str) or not all(isinstance(x, str) for x in streams)
            ):
                raise ValueError("streams must be a list of names or null")
            self.streams = None if streams is None else frozenset(streams)
        if "stalled" in changes:
            if changes["stalled"]:
                self.stall()
            else:
                self.resume()
        return self.config()

    # --- server ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2 * MAX_REQUEST_BYTES)  # room for base64
        app.router.add_post("/", self._handle_api)
        app.router.add_get("/_emulator/stats", self._handle_stats)
        app.router.add_post("/_emulator/config", self._handle_config)
        app.router.add_post("/_emulator/reset", self._handle_reset)
        app.router.add_get("/_emulator/records/{stream}", self._handle_records)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._flowing = asyncio.Event()
        if not self._stalled:
            self._flowing.set()
        # Stalled calls are released on stop, so shutdown need not wait long for handlers.
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self._url = f"http://{bound[0]}:{bound[1]}"

    async def stop(self) -> None:
        if self._runner is None:
            return
        if self._flowing is not None:
            self._flowing.set()  # let stalled calls finish instead of cancelling them mid-reply
        await self._runner.cleanup()
        self._runner = None

    @property
    def endpoint_url(self) -> str:
        if self._url is None:
            raise RuntimeError("the emulator is not started")
        return self._url

    # --- the Firehose API ------------------------------------------------------------------

    async def _handle_api(self, request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "")
        operation = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else ""
        if m := _CREDENTIAL.search(request.headers.get("Authorization", "")):
            self.calls_by_access_key[m[1]] = self.calls_by_access_key.get(m[1], 0) + 1
        try:
            if operation != "PutRecordBatch":
                raise _ApiError("UnknownOperationException", f"Unknown operation {target!r}")
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError as exc:
                raise _ApiError("SerializationException", "Request body is not JSON") from exc
            reply = await self._put_record_batch(body)
        except _ApiError as err:
            return _json_response({"__type": err.code, "message": err.message}, status=400)
        return _json_response(reply)

    async def _put_record_batch(self, body: Any) -> dict[str, Any]:
        self.calls += 1
        if self._flowing is not None and not self._flowing.is_set():
            await self._flowing.wait()
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        stream, datas = _parse_put_record_batch(body)
        if self.streams is not None and stream not in self.streams:
            raise _ApiError(
                "ResourceNotFoundException",
                f"Firehose {stream} under account 123456789012 not found.",
            )
        if self.throttle_rate > 0 and self.random.random() < self.throttle_rate:
            self.throttled_calls += 1
            raise _ApiError("ServiceUnavailableException", "Slow down.")
        return self._accept(stream, datas)

    def _accept(self, stream: str, datas: list[bytes]) -> dict[str, Any]:
        if self.fail_rate > 0 or self.lose_records > 0:
            accepted, responses, failed = self._decide_each(datas)
        else:  # the benchmark's path: no decision per record, so none of its Python cost
            accepted, responses, failed = datas, self._successes(len(datas)), 0
        if self.on_accept is not None and accepted:
            self.on_accept(stream, accepted)
        self.failed_records += failed
        self.accepted_records += len(accepted)
        self.accepted_bytes += sum(map(len, accepted))
        self.accepted_events += sum(map(bytes.count, accepted, repeat(b"\n")))
        self.accepted_by_stream[stream] = self.accepted_by_stream.get(stream, 0) + len(accepted)
        if self.keep_records:
            self.records.setdefault(stream, []).extend(accepted)
        return {"FailedPutCount": failed, "Encrypted": False, "RequestResponses": responses}

    def _successes(self, n: int) -> list[dict[str, str]]:
        first = self._next_id + 1
        self._next_id += n
        return [{"RecordId": f"{i:032x}"} for i in range(first, first + n)]

    def _decide_each(self, datas: list[bytes]) -> tuple[list[bytes], list[dict[str, str]], int]:
        """Per-record faults: the records kept, every record's reply entry, how many failed."""
        fail_rate = self.fail_rate
        draw = self.random.random
        accepted: list[bytes] = []
        responses: list[dict[str, str]] = []
        failed = 0
        for data in datas:
            if fail_rate > 0 and draw() < fail_rate:
                failed += 1
                responses.append(
                    {"ErrorCode": "ServiceUnavailableException", "ErrorMessage": "Slow down."}
                )
                continue
            responses.extend(self._successes(1))
            if self.lose_records > 0:
                self.lose_records -= 1
                self.lost_records += 1
                continue
            accepted.append(data)
        return accepted, responses, failed

    # --- control endpoints -----------------------------------------------------------------

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return _json_response(self.stats(), content_type="application/json")

    async def _handle_config(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            config = self.configure(**changes)
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
            return _json_response({"error": str(exc)}, 400, "application/json")
        return _json_response(config, content_type="application/json")

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json_response(self.stats(), content_type="application/json")

    async def _handle_records(self, request: web.Request) -> web.Response:
        """The stream's accepted data concatenated: NDJSON when records hold whole lines."""
        if not self.keep_records:
            return _json_response({"error": "keep_records is off"}, 409, "application/json")
        data = b"".join(self.records.get(request.match_info["stream"], []))
        return web.Response(body=data, content_type="application/octet-stream")


def _parse_put_record_batch(body: Any) -> tuple[str, list[bytes]]:
    """The stream name and decoded record data, refused as Firehose refuses them."""
    if not isinstance(body, dict):
        raise _ApiError("SerializationException", "Request body is not a JSON object")
    stream = body.get("DeliveryStreamName")
    records = body.get("Records")
    if not isinstance(stream, str) or not stream:
        raise _ApiError("ValidationException", "DeliveryStreamName is required")
    if not isinstance(records, list) or not 1 <= len(records) <= MAX_RECORDS:
        raise _ApiError(
            "ValidationException",
            f"Records must have between 1 and {MAX_RECORDS} members",
        )
    try:
        datas = [b64decode(record["Data"], validate=True) for record in records]
    except (KeyError, TypeError, binascii.Error) as exc:
        raise _ApiError("SerializationException", "Record Data must be base64") from exc
    if max(map(len, datas)) > MAX_RECORD_BYTES:
        raise _ApiError("InvalidArgumentException", "Record size exceeds 1000 KiB")
    if sum(map(len, datas)) > MAX_REQUEST_BYTES:
        raise _ApiError("InvalidArgumentException", "Records exceed 4 MiB in total")
    return stream, datas


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a count (an integer >= 0): {value!r}")
    return value


def _json_response(
    payload: Any, status: int = 200, content_type: str = CONTENT_TYPE
) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=content_type)


class EmulatorThread:
    """A :class:`FirehoseEmulator` on its own event loop in a daemon thread, for synchronous
    tests (the aggregator under test may be a subprocess). Every accessor runs on the
    emulator's loop, so it is safe from any thread::

        with EmulatorThread(fail_rate=0.2, seed=1) as emu:
            ... endpoint_url=emu.endpoint_url ...
            emu.wait_for_lines("stream", 1000)
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **emulator: Any) -> None:
        self.emulator = FirehoseEmulator(**emulator)
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        started: Future[None] = Future()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.emulator.start(self._host, self._port))
            except BaseException as exc:
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            loop.run_forever()
            loop.run_until_complete(self.emulator.stop())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="firehose-emulator", daemon=True)
        self._thread.start()
        started.result(timeout=10)

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = self._thread = None

    def __enter__(self) -> EmulatorThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        return self.emulator.endpoint_url

    def _call(self, fn: Callable[[], T]) -> T:
        if self._loop is None:
            raise RuntimeError("the emulator thread is not started")

        async def on_loop() -> T:
            return fn()

        coro: Coroutine[Any, Any, T] = on_loop()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def records(self, stream: str) -> list[bytes]:
        """A copy of the data of every record accepted on ``stream``, in arrival order."""
        return self._call(lambda: list(self.emulator.records.get(stream, [])))

    def lines(self, stream: str) -> list[bytes]:
        """The accepted events of ``stream``: records split at newlines (aggregated or not)."""
        return b"".join(self.records(stream)).splitlines(keepends=True)

    def stats(self) -> dict[str, Any]:
        return self._call(self.emulator.stats)

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change fail_rate, throttle_rate, latency, lose_records, stalled or streams; returns
        the new settings."""
        return self._call(lambda: self.emulator.configure(**changes))

    def stall(self) -> None:
        self._call(self.emulator.stall)

    def resume(self) -> None:
        self._call(self.emulator.resume)

    def reset(self) -> None:
        self._call(self.emulator.reset)

    def wait_for_lines(self, stream: str, count: int, timeout: float = 10.0) -> list[bytes]:
        """Poll until ``stream`` holds at least ``count`` lines; returns them (or raises
        TimeoutError with how many arrived)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines(stream)
            if len(lines) >= count:
                return lines
            if time.monotonic() > deadline:
                raise TimeoutError(f"{stream}: {len(lines)} of {count} lines after {timeout}s")
            time.sleep(0.02)
