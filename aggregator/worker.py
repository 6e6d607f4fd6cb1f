"""One worker: an event loop running the sources and the pipeline until told to stop.

Stopping, as Fluentd does on SIGTERM/SIGINT: stop accepting; read open connections until they
are quiet (``drain_quiet_period``) or ``drain_timeout`` passes, then close them; flush every
buffer with its retries until ``shutdown_timeout``; exit 0 only when nothing was dropped.
A second SIGTERM/SIGINT during that stops at once. SIGUSR1 flushes every buffer now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Protocol

from aggregator.config.model import Config, ForwardSource, HttpSource
from aggregator.pipeline import Pipeline
from aggregator.sources.forward import ForwardServer
from aggregator.sources.http import HttpServer

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_DROPPED = 1
EXIT_FORCED = 3


class Source(Protocol):
    @property
    def port(self) -> int: ...

    async def start(self) -> None: ...

    def stop_accepting(self) -> None: ...


class Worker:
    def __init__(self, config: Config, worker: int = 0) -> None:
        self.config = config
        self.pipeline = Pipeline(config, worker)
        self.forward: list[ForwardServer] = []
        self.http: list[HttpServer] = []
        for settings in config.sources:
            if isinstance(settings, ForwardSource):
                self.forward.append(ForwardServer(settings, self.pipeline))
            elif isinstance(settings, HttpSource):
                self.http.append(HttpServer(settings, self.pipeline, config.server.drain_timeout))
        self._stop = asyncio.Event()
        self._stopping = False

    @property
    def sources(self) -> list[Source]:
        return [*self.forward, *self.http]

    async def start(self) -> None:
        await self.pipeline.start()
        for source in self.sources:
            await source.start()

    def request_stop(self) -> None:
        if self._stopping:
            log.error("second stop signal: exiting now, buffered events are lost")
            os._exit(EXIT_FORCED)
        self._stopping = True
        self._stop.set()

    async def wait_stopped(self) -> int:
        await self._stop.wait()
        return await self.shutdown()

    async def shutdown(self) -> int:
        server = self.config.server
        started = time.monotonic()
        deadline = started + server.shutdown_timeout
        log.info("stopping: no new connections; draining open ones")
        for source in self.sources:
            source.stop_accepting()
        await asyncio.gather(
            *(f.drain(server.drain_quiet_period, server.drain_timeout) for f in self.forward),
            *(h.drain() for h in self.http),
        )
        log.info("stopping: flushing buffers", extra={"deadline_s": round(deadline - started, 1)})
        dropped = await self.pipeline.close(deadline)
        elapsed = round(time.monotonic() - started, 3)
        if dropped:
            log.error(
                f"stopped: {dropped} events dropped (see aggregator_dropped_events_total)",
                extra={"dropped": dropped, "seconds": elapsed},
            )
            return EXIT_DROPPED
        log.info("stopped: every buffered event was delivered", extra={"seconds": elapsed})
        return EXIT_OK


def install_signals(worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
    loop.add_signal_handler(signal.SIGTERM, worker.request_stop)
    loop.add_signal_handler(signal.SIGINT, worker.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, worker.pipeline.flush_all)


async def serve(config: Config, on_ready: Callable[[Worker], None] | None = None) -> int:
    worker = Worker(config)
    install_signals(worker, asyncio.get_running_loop())
    await worker.start()
    ports = {s.settings.name: s.port for s in worker.forward} | {
        s.settings.name: s.port for s in worker.http
    }
    log.info("ready", extra={"ports": ports, "pid": os.getpid()})
    if on_ready is not None:
        on_ready(worker)
    return await worker.wait_stopped()


def new_event_loop() -> asyncio.AbstractEventLoop:
    with contextlib.suppress(ImportError):
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def run(config: Config) -> int:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(serve(config))
