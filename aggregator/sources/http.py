"""The HTTP input, compatible with Fluentd's in_http; the control plane shares its port.

``POST /app.access`` (or ``/app/access``) carries events for tag ``app.access``: a ``json=`` or
``msgpack=`` parameter in the query or a form body, or a JSON or msgpack body; an array is a
batch; ``time=`` sets the event time (default now). Answers as in_http does: 200 with an empty
body, 400 with the reason, 413 for a body over ``body_size_limit``; and 503 when the destination's
buffer is full and refuses (``overflow_action = throw_exception``).

Reserved paths: ``GET /api/health``, ``POST /api/flush``, ``GET /metrics``, answered by
:mod:`aggregator.control`. A request from a web page (an ``Origin`` header not in
``cors_allow_origins``) is refused, so no browser can be made to post to the aggregator (nor to
the control plane).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qsl

import msgpack
import orjson
from aiohttp import web

from aggregator import metrics
from aggregator.admission import Refused, Wait
from aggregator.config.model import HttpSource, Server
from aggregator.control import ControlPlane
from aggregator.formatting import InvalidEvent
from aggregator.pipeline import Pipeline
from aggregator.protocol.decoder import DEFAULT_MAX_ENTRIES
from aggregator.sources import Listener
from aggregator.stores import Commit

log = logging.getLogger(__name__)

_MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")


class BadRequest(ValueError):
    pass


def _text(status: int, body: str = "") -> web.Response:
    return web.Response(status=status, text=body, content_type="text/plain")


def _bad_request(reason: str) -> web.Response:
    return _text(400, f"400 Bad Request\n{reason}\n")


def _refusal(refused: Refused) -> web.Response:
    """A tenant over its limits gets 429 with when to try again; a full buffer that refuses
    (throw_exception) 503; a tag too long 400."""
    if refused.reason == "tag_too_long":
        return _bad_request("the tag is longer than tag_length_limit")
    if refused.reason == "buffer_full":
        return _text(503, "503 Service Unavailable\nbuffer full\n")
    response = _text(429, f"429 Too Many Requests\n{refused.reason}\n")
    response.headers["Retry-After"] = str(max(1, math.ceil(refused.retry_after)))
    return response


def tag_from_path(path: str) -> str:
    """``/app/access`` and ``/app.access`` are both tag ``app.access`` (in_http's rule)."""
    return ".".join(part for part in path.split("/") if part)


def _records(payload: Any) -> list[Any]:
    if payload is None:
        return []  # in_http skips a null record
    records = payload if isinstance(payload, list) else [payload]
    for record in records:
        if not isinstance(record, dict):
            raise BadRequest(
                f"an event must be a JSON object or msgpack map, not {type(record).__name__}"
            )
    return records


def _event_time(raw: str | None, clock: Callable[[], float]) -> float:
    if not raw:
        return clock()
    try:
        t = float(raw)
    except ValueError as exc:
        raise BadRequest(f"time must be a number of seconds: {raw!r}") from exc
    if not math.isfinite(t):
        raise BadRequest(f"time must be a finite number of seconds: {raw!r}")
    return t or clock()


def _form(raw: str) -> dict[str, bytes]:
    """Form or query parameters with their values as the exact bytes sent (latin-1 maps each
    percent-escaped byte to one character), so binary msgpack survives."""
    return {k: v.encode("latin-1") for k, v in parse_qsl(raw, keep_blank_values=True,
                                                         encoding="latin-1")}  # fmt: skip


def _unpack(data: bytes, max_items: int) -> Any:
    return msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape",
                           strict_map_key=False, max_array_len=max_items,
                           max_map_len=max_items)  # fmt: skip


async def parse_events(
    request: web.Request,
    clock: Callable[[], float] = time.time,
    max_events: int = DEFAULT_MAX_ENTRIES,
) -> list[Any]:
    """The ``[[time, record], ...]`` entries a request carries, at most ``max_events`` (and
    msgpack arrays and maps of at most that many items, refused before they are built).
    Raises :class:`BadRequest`."""
    params = _form(request.rel_url.raw_query_string)
    content_type = request.content_type
    body = b""
    if content_type == "multipart/form-data":
        for key, value in (await request.post()).items():
            params[key] = (
                value.file.read()
                if isinstance(value, web.FileField)
                else value.encode()
                if isinstance(value, str)
                else bytes(value)
            )
    elif request.body_exists:
        body = await request.read()
        if content_type == "application/x-www-form-urlencoded":
            params.update(_form(body.decode("latin-1")))
            body = b""
    try:
        if "msgpack" in params:
            payload = _unpack(params["msgpack"], max_events)
        elif "json" in params:
            payload = orjson.loads(params["json"])
        elif content_type in _MSGPACK_TYPES:
            payload = _unpack(body, max_events)
        elif content_type == "application/x-ndjson":
            payload = [orjson.loads(line) for line in body.splitlines() if line.strip()]
        elif body:
            payload = orjson.loads(body)
        else:
            raise BadRequest("'json' or 'msgpack' parameter is required")
    except BadRequest:
        raise
    except (ValueError, msgpack.UnpackException) as exc:
        raise BadRequest(f"cannot parse the event: {exc}") from exc
    raw_time = params.get("time")
    t = _event_time(raw_time.decode("latin-1") if raw_time else None, clock)
    records = _records(payload)
    if len(records) > max_events:
        raise BadRequest(f"{len(records)} events in one request; at most {max_events}")
    return [[t, record] for record in records]


class HttpServer:
    def __init__(self, settings: HttpSource, pipeline: Pipeline, server: Server) -> None:
        self.settings = settings
        self._server = server
        self.pipeline = pipeline
        self.control = ControlPlane(pipeline, server.buffer_high_water, settings.control_token)
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        self._m_events = metrics.INPUT_EVENTS.labels(settings.name)
        self._m_bytes = metrics.INPUT_BYTES.labels(settings.name)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def port(self) -> int:
        assert self._runner is not None
        addresses = self._runner.addresses
        port: int = addresses[0][1]
        return port

    def _app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.body_size_limit, middlewares=[self._cors]
        )
        self.control.mount(app)
        app.router.add_route("*", "/{path:.*}", self._events)
        return app

    async def start(self, listener: Listener | None = None) -> None:
        self._runner = web.AppRunner(
            self._app(), handle_signals=False, access_log=None,
            shutdown_timeout=self._server.drain_timeout,
            # aiohttp (>= 3.14.5) arms this timer when a connection opens and again after each
            # answer, and closes the connection if no complete request head came by then.
            keepalive_timeout=self.settings.keepalive_timeout,
        )  # fmt: skip
        await self._runner.setup()
        if listener is not None:
            self._site = web.SockSite(self._runner, listener.tcp)
        else:
            self._site = web.TCPSite(self._runner, self.settings.bind, self.settings.port,
                                     reuse_address=True)  # fmt: skip
        await self._site.start()
        log.info(
            "http input listening",
            extra={"source": self.settings.name, "bind": self.settings.bind, "port": self.port},
        )

    def stop_accepting(self) -> None:
        self.control.stopping = True

    async def drain(self, until: float) -> None:
        """Stop listening, let requests in progress finish until ``until`` (a time.monotonic()
        time), close the rest."""
        runner = self._runner
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()
        if runner.server is not None:
            # What runner.cleanup() does, but with this stop's deadline, not a fixed timeout.
            runner.server.pre_shutdown()
            await runner.server.shutdown(max(0.0, until - time.monotonic()))
        await runner.cleanup()

    # --- handlers ---------------------------------------------------------------------------

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "POST", "PUT"):
            return _text(405, "405 Method Not Allowed\n")
        tag = tag_from_path(request.path)
        if not tag:
            return _bad_request("the path must name a tag, e.g. POST /app.access")
        if request.content_length:
            self._m_bytes.inc(request.content_length)
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                entries = await parse_events(request, max_events=self.settings.body_entries_limit)
        except BadRequest as exc:
            metrics.INPUT_ERRORS.labels(self.settings.name, "bad_request").inc()
            return _bad_request(str(exc))
        except TimeoutError:
            metrics.INPUT_ERRORS.labels(self.settings.name, "body_timeout").inc()
            timeout = self.settings.body_timeout
            return _text(408, f"408 Request Timeout\nthe body did not arrive in {timeout:g} s\n")
        if not entries:
            return _text(200)
        source, label = self.settings.name, self.settings.label
        try:
            # All or nothing, as in_http: a 400 must mean that none was taken.
            answer = self.pipeline.dispatch(tag, entries, source, label=label, strict=True)
            if isinstance(answer, Wait):  # a full buffer that blocks: the request waits
                answer = await self.pipeline.offer(answer, tag, entries, source, label=label,
                                                   strict=True)  # fmt: skip
        except InvalidEvent as exc:
            metrics.INPUT_ERRORS.labels(source, exc.reason).inc()
            return _bad_request(str(exc))
        self._m_events.inc(len(entries))
        if isinstance(answer, Refused):
            return _refusal(answer)
        if isinstance(answer, Commit) and not await answer.wait():
            return _text(503, "503 Service Unavailable\nthe buffer could not be written\n")
        return _text(200)

    @web.middleware
    async def _cors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            return cast(web.StreamResponse, await handler(request))
        allowed = self.settings.cors_allow_origins
        if "*" not in allowed and origin not in allowed:
            metrics.INPUT_ERRORS.labels(self.settings.name, "origin_refused").inc()
            return _text(403, f"403 Forbidden\norigin {origin[:100]} is not allowed\n")
        if request.method == "OPTIONS":  # a browser's preflight
            response: web.StreamResponse = _text(200)
            response.headers["Access-Control-Allow-Methods"] = "POST, PUT, GET"
            response.headers["Access-Control-Allow-Headers"] = "Content-Type"
        else:
            response = await handler(request)
        response.headers["Access-Control-Allow-Origin"] = origin
        return response
