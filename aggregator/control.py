"""The control plane, mounted on the HTTP input's port: ``GET /api/health``, ``POST /api/flush``
and ``GET /metrics``.

It carries no events. With ``control_token`` set, /api/flush and /metrics need it as a bearer
token; without, /metrics is open and flushing is for clients on this host only (loopback).
/api/health is always open: load balancers and the image's HEALTHCHECK ask it.
"""

from __future__ import annotations

import hmac
import ipaddress
import time

import orjson
from aiohttp import web

from aggregator import metrics, process
from aggregator.pipeline import Pipeline

FLUSH_MIN_INTERVAL = 1.0
"""Seconds between two flushes a worker starts for /api/flush: a storm of requests must not
turn into a storm of tiny PutRecordBatch calls."""
HEALTH_CACHE_SECONDS = 0.5
"""How long one computed /api/health answer is served again (it reads every worker's metrics)."""


def is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:  # a Unix socket, or no address at all
        return False


def _text(status: int, body: str) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/plain")


def _by_destination(samples: dict[tuple[tuple[str, str], ...], float]) -> dict[str, float]:
    return {dict(labels)["destination"]: value for labels, value in samples.items()}


class ControlPlane:
    def __init__(self, pipeline: Pipeline, high_water: float, token: str | None) -> None:
        self.pipeline = pipeline
        self._high_water = high_water
        self._token = token
        self.stopping = False
        """Set when the worker stops: /api/health says so (503) from then on."""
        self._last_flush = -FLUSH_MIN_INTERVAL
        self._health_cache: tuple[float, int, bytes] | None = None

    def mount(self, app: web.Application) -> None:
        """Add the control routes to ``app``; add them before any catch-all route."""
        app.router.add_get("/api/health", self._health)
        app.router.add_post("/api/flush", self._flush)
        app.router.add_get("/metrics", self._metrics)

    async def _health(self, request: web.Request) -> web.Response:
        """The whole service's state, from any worker: the merged metrics of every worker and
        the supervisor's count of live workers. Computed at most every HEALTH_CACHE_SECONDS:
        a load balancer (or anyone) asking often costs a dictionary lookup."""
        now = time.monotonic()
        cached = self._health_cache
        if cached is None or now - cached[0] >= HEALTH_CACHE_SECONDS or self.stopping:
            status, body = self._health_state()
            self._health_cache = cached = (now, status, body)
        return web.Response(status=cached[1], body=cached[2], content_type="application/json")

    def _health_state(self) -> tuple[int, bytes]:
        buffered = _by_destination(metrics.values("aggregator_buffer_bytes"))
        fill = _by_destination(metrics.values("aggregator_buffer_fill_ratio"))
        last = _by_destination(metrics.values("aggregator_last_success_timestamp_seconds"))
        problems = ["stopping"] if self.stopping else []
        destinations = {}
        for name, dest in self.pipeline.destinations.items():
            # This worker's own buffer is exact now; the merged gauges may lag a moment.
            store = dest.flusher.store
            ratio = max(fill.get(name, 0.0), store.fill_ratio)
            if ratio > self._high_water:
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

    async def _metrics(self, request: web.Request) -> web.Response:
        if not self._authorized(request, open_without_token=True):
            return _text(401, "401 Unauthorized\ncontrol_token required\n")
        body, content_type = metrics.render()
        response = web.Response(status=200, body=body)
        response.headers["Content-Type"] = content_type
        return response

    def _authorized(self, request: web.Request, *, open_without_token: bool) -> bool:
        if self._token is None:
            return open_without_token or is_loopback(request.remote)
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode())
