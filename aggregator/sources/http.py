"""The HTTP input, compatible with Fluentd's in_http, plus the service's own endpoints.

``POST /app.access`` (or ``/app/access``) carries events for tag ``app.access``: a ``json=`` or
``msgpack=`` parameter in the query or a form body, or a JSON or msgpack body; an array is a
batch; ``time=`` sets the event time (default now). Answers as in_http does: 200 with an empty
body, 400 with the reason, 413 for a body over ``body_size_limit``; and 503 when the destination's
buffer is full and refuses (``overflow_action = throw_exception``).

Reserved paths: ``GET /api/health``, ``POST /api/flush``, ``GET /metrics``. The last two are
the control plane: with ``control_token`` set they need it as a bearer token; without, flushing
is for clients on this host only. A request from a web page (an ``Origin`` header not in
``cors_allow_origins``) is refused, so no browser can be made to post to the aggregator.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qsl

import msgpack
import orjson
from aiohttp import web

from aggregator import metrics, process
from aggregator.admission import Refused, Wait
from aggregator.config.model import HttpSource, Server
from aggregator.formatting import InvalidEvent
from aggregator.pipeline import Pipeline
from aggregator.protocol.decoder import DEFAULT_MAX_ENTRIES
from aggregator.sources import Listener
from aggregator.stores import Commit

log = logging.getLogger(__name__)

_MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
FLUSH_MIN_INTERVAL = 1.0
"""Seconds between two flushes a worker starts for /api/flush: a storm of requests must not
turn into a storm of tiny PutRecordBatch calls."""
HEALTH_CACHE_SECONDS = 0.5
"""How long one computed /api/health answer is served again (it reads every worker's metrics)."""


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


def is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:  # a Unix socket, or no address at all
        return False


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


def _by_destination(samples: dict[tuple[tuple[str, str], ...], float]) -> dict[str, float]:
    return {dict(labels)["destination"]: value for labels, value in samples.items()}


class HttpServer:
    def __init__(self, settings: HttpSource, pipeline: Pipeline, server: Server) -> None:
        self.settings = settings
        self._server = server
        self.pipeline = pipeline
        self.accepting = True
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        self._m_events = metrics.INPUT_EVENTS.labels(settings.name)
        self._m_bytes = metrics.INPUT_BYTES.labels(settings.name)
        self._last_flush = -FLUSH_MIN_INTERVAL
        self._health_cache: tuple[float, int, bytes] | None = None

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
        app.router.add_get("/api/health", self._health)
        app.router.add_post("/api/flush", self._flush)
        app.router.add_get("/metrics", self._metrics)
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
        self.accepting = False

    async def drain(self, until: float) -> None:
        """Stop listening, let requests in progress finish (up to the drain timeout), close the
        rest."""
        if self._runner is not None:
            await self._runner.cleanup()

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

    async def _health(self, request: web.Request) -> web.Response:
        """The whole service's state, from any worker: the merged metrics of every worker and
        the supervisor's count of live workers. Computed at most every HEALTH_CACHE_SECONDS:
        a load balancer (or anyone) asking often costs a dictionary lookup."""
        now = time.monotonic()
        cached = self._health_cache
        if cached is None or now - cached[0] >= HEALTH_CACHE_SECONDS or not self.accepting:
            status, body = self._health_state()
            self._health_cache = cached = (now, status, body)
        return web.Response(status=cached[1], body=cached[2], content_type="application/json")

    def _health_state(self) -> tuple[int, bytes]:
        buffered = _by_destination(metrics.values("aggregator_buffer_bytes"))
        fill = _by_destination(metrics.values("aggregator_buffer_fill_ratio"))
        last = _by_destination(metrics.values("aggregator_last_success_timestamp_seconds"))
        high_water = self._server.buffer_high_water
        problems = [] if self.accepting else ["stopping"]
        destinations = {}
        for name, dest in self.pipeline.destinations.items():
            # This worker's own buffer is exact now; the merged gauges may lag a moment.
            store = dest.flusher.store
            ratio = max(fill.get(name, 0.0), store.fill_ratio)
            if ratio > high_water:
                problems.append(f"buffer {name} is {ratio:.0%} full")
            destinations[name] = {
                "buffered_bytes": int(buffered.get(name, store.held_bytes)),
                "fill_ratio": round(ratio, 4),
                "last_success": last.get(name) or dest.flusher.last_success,
            }
        body: dict[str, object] = {}
        state = process.read_state()
        if state is not None:
            body["workers"] = state
            if state["alive"] < state["expected"]:
                problems.append(f"{state['expected'] - state['alive']} worker(s) missing")
        body["status"] = "unavailable" if problems else "ok"
        body["problems"] = problems
        body["destinations"] = destinations
        return 503 if problems else 200, orjson.dumps(body)

    async def _flush(self, request: web.Request) -> web.Response:
        if not self._authorized(request, open_without_token=False):
            return _text(401, "401 Unauthorized\ncontrol_token required, or ask from this host\n")
        now = time.monotonic()
        if now - self._last_flush < FLUSH_MIN_INTERVAL:
            response = _text(429, "429 Too Many Requests\na flush was started just now\n")
            response.headers["Retry-After"] = "1"
            return response
        self._last_flush = now
        process.flush_everywhere(self.pipeline.flush_all)
        return web.Response(status=200, body=b'{"flushed":true}', content_type="application/json")

    def _authorized(self, request: web.Request, *, open_without_token: bool) -> bool:
        token = self.settings.control_token
        if token is None:
            return open_without_token or is_loopback(request.remote)
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

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

    async def _metrics(self, request: web.Request) -> web.Response:
        if not self._authorized(request, open_without_token=True):
            return _text(401, "401 Unauthorized\ncontrol_token required\n")
        body, content_type = metrics.render()
        response = web.Response(status=200, body=body)
        response.headers["Content-Type"] = content_type
        return response
