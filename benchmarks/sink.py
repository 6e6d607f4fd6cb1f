"""The benchmark's Firehose: the project's emulator, counting only, plus latency sampling.

``python -m benchmarks.sink --port 0`` takes the emulator's options (faults included), prints
``listening on http://127.0.0.1:PORT`` and serves until SIGTERM. Besides the emulator's
``/_emulator/*`` routes it answers ``GET /_bench/stats`` (the emulator's stats and the latency
summary) and ``POST /_bench/reset`` (zero both).

:class:`SinkProcess` is the runner's side: it starts that process and talks to it over HTTP.
The sink runs in a process of its own so that its CPU is never counted as the aggregator's,
and so that it does not compete with the runner's own loop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import IO, Any

import orjson
from aiohttp import web

from benchmarks import eventloop
from benchmarks.latency import LatencySampler
from emulator import FirehoseEmulator
from emulator.__main__ import build_parser, emulator_options, serve

READY_PREFIX = "listening on "


class BenchSink(FirehoseEmulator):
    """A :class:`FirehoseEmulator` that keeps no records and samples latency."""

    def __init__(self, *, sample_every: int = 50, **options: Any) -> None:
        self.sampler = LatencySampler(sample_every)
        super().__init__(**{**options, "keep_records": False}, on_accept=self.sampler)

    def bench_stats(self) -> dict[str, Any]:
        return {"emulator": self.stats(), "latency": self.sampler.summary()}

    def reset(self) -> None:
        super().reset()
        self.sampler.reset()

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/_bench/stats", self._handle_bench_stats)
        app.router.add_post("/_bench/reset", self._handle_bench_reset)
        return app

    async def _handle_bench_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.bench_stats()), content_type="application/json")

    async def _handle_bench_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return await self._handle_bench_stats(request)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m benchmarks.sink", "The benchmark's Firehose emulator.")
    parser.add_argument(
        "--sample-every", type=int, default=50, metavar="K", help="read the send time of 1 in K"
    )
    args = parser.parse_args(argv)
    if args.keep_records:
        parser.error("the benchmark sink only counts; use python -m emulator")
    try:
        sink = BenchSink(sample_every=args.sample_every, **emulator_options(args))
    except ValueError as exc:
        parser.error(str(exc))
    eventloop.run(serve(sink, args.host, args.port))
    return 0


REQUEST_TIMEOUT = 30.0
"""Seconds for the sink to answer the runner (it may be busy with a flood of requests)."""


class SinkProcess:
    """``python -m benchmarks.sink`` as a child process, and its HTTP control routes."""

    def __init__(self, args: list[str], stderr_path: Path, start_timeout: float = 20.0) -> None:
        root = Path(__file__).resolve().parent.parent
        path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        self._stderr = stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.sink", *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=root,
            env=env,
            text=True,
            start_new_session=True,  # a terminal's Ctrl-C reaches the runner, which stops us
        )
        assert self.proc.stdout is not None
        line = _read_line(self.proc.stdout, start_timeout)
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise RuntimeError(f"the sink did not start: {line!r}\n{stderr_path.read_text()}")
        self.url = line.removeprefix(READY_PREFIX).strip()
        self._last_stats: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict[str, Any]:
        """The emulator's counters (cheap: for progress). A sink busy past the request timeout
        (a peer without backpressure can flood it) gives the last counters it gave."""
        try:
            self._last_stats = self._request("/_emulator/stats")
        except OSError:  # includes timeouts
            if self._last_stats is None:
                raise
        return self._last_stats

    def bench_stats(self) -> dict[str, Any]:
        """Counters and the latency summary (sorts every sample: for the end of a run)."""
        return self._request("/_bench/stats")

    def configure(self, **changes: Any) -> dict[str, Any]:
        return self._request("/_emulator/config", changes)

    def reset(self) -> dict[str, Any]:
        return self._request("/_bench/reset", {})

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()
        return self.proc.returncode

    def _request(self, path: str, body: Any = None) -> dict[str, Any]:
        data = None if body is None else orjson.dumps(body)
        method = "GET" if data is None else "POST"
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            reply: dict[str, Any] = orjson.loads(response.read())
        return reply


def _read_line(stream: IO[str], timeout: float) -> str:
    """One line from a child's pipe, or "" when it does not come in time."""
    result: list[str] = []

    def read() -> None:
        result.append(stream.readline())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


if __name__ == "__main__":
    sys.exit(main())
