"""One worker process: an event loop running the sources and the pipeline until told to stop.

The supervisor starts each worker as ``python -m aggregator.worker`` with the listening sockets
it bound (inherited file descriptors), and a pipe on which the worker says when it is ready.

Stopping, on SIGTERM, follows :class:`aggregator.stopping.StopPlan`: stop accepting; close each
open connection at its first safe moment (:mod:`aggregator.sources.forward`); flush every
buffer with short retries; hand what is left to ``[server] handoff``, then to the secondaries;
all before ``stop_timeout``. Exit status 0 when every event reached its destination or was
handed off, 1 when, during the stop, events had to go to a secondary destination or were
dropped. SIGUSR1 flushes every buffer now.

One stop per stop: a SIGTERM that arrives while stopping is ignored when supervised (a signal
to the whole process group reaches the worker twice: directly and from the supervisor); the
supervisor forces an immediate stop with SIGUSR2 (status 3). A worker run on its own takes a
second SIGTERM or SIGINT as that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Sequence

from aggregator import logs, metrics, process
from aggregator.config import ConfigError, load
from aggregator.config.model import Config, ForwardSource
from aggregator.forward_client import handoff_peer
from aggregator.pipeline import Pipeline
from aggregator.process import EXIT_CONFIG, EXIT_FORCED, EXIT_OK, EXIT_UNDELIVERED
from aggregator.sources import Listener, Source, build_source
from aggregator.stopping import StopPlan

log = logging.getLogger("aggregator.worker")  # not __main__ when run with -m

ORPHAN_CHECK_INTERVAL = 1.0
OPEN_FILES_RESERVE = 64
"""Descriptors a worker needs besides its client connections: listeners, sink connections,
files, the event loop's own."""


class Worker:
    def __init__(self, config: Config, index: int = 0, workers: int = 1) -> None:
        self.config = config
        self.index = index
        self.pipeline = Pipeline(config, index, workers)
        self.sources: list[Source] = [
            build_source(settings, self.pipeline, config.server) for settings in config.sources
        ]
        self._stop = asyncio.Event()
        self._stopping = False
        self.supervised = False
        self._handoff = handoff_peer(config)  # at start: a TLS file that cannot be read says so

    async def start(self, listeners: Sequence[Listener] | None = None) -> None:
        """Start the pipeline, then the sources: on the given sockets (one per source, in config
        order) or by binding their own."""
        await self.pipeline.start()
        for i, source in enumerate(self.sources):
            await source.start(listeners[i] if listeners else None)

    def ports(self) -> dict[str, int]:
        return {s.name: s.port for s in self.sources}

    def request_stop(self) -> None:
        if self._stopping:
            if self.supervised:
                log.info("stop signal while stopping: ignored (already stopping)")
                return
            self.force_stop()
        self._stopping = True
        self._stop.set()

    def force_stop(self) -> None:
        """Exit now. What memory buffers hold is lost: counted, so the summary says so (file
        buffers keep theirs on disk for the next start)."""
        for dest in self.pipeline.destinations.values():
            if events := dest.flusher.volatile_events:
                metrics.DROPPED_EVENTS.labels(dest.name, "forced_stop").inc(events)
        metrics.publish_tallies()
        log.error("forced stop: exiting now; buffered events are lost")
        logging.shutdown()
        os._exit(EXIT_FORCED)

    async def wait_stopped(self) -> int:
        await self._stop.wait()
        return await self.shutdown()

    async def shutdown(self) -> int:
        server = self.config.server
        started = time.monotonic()
        plan = StopPlan.make(
            server, started, handoff=server.handoff is not None,
            secondary=self.pipeline.has_secondary,
        )  # fmt: skip
        buffers = [d.flusher for d in self.pipeline.destinations.values()]
        undelivered_before = sum(b.dropped + b.diverted for b in buffers)
        log.info(
            "stopping: no new connections; closing open ones at their safe moment",
            extra={"deadline_s": round(plan.end - started, 1)},
        )
        for source in self.sources:
            source.stop_accepting()
        await asyncio.gather(*(s.drain(plan.drain_until) for s in self.sources))
        flush_s = round(plan.flush_until - started, 1)
        log.info("stopping: flushing buffers", extra={"flush_s": flush_s})
        kept = await self.pipeline.close(plan, self._handoff)
        elapsed = round(time.monotonic() - started, 3)
        dropped = sum(b.dropped for b in buffers)
        diverted = sum(b.diverted for b in buffers)
        handed_off = sum(b.handed_off for b in buffers)
        counts = {"handed_off": handed_off, "dropped": dropped, "diverted": diverted,
                  "seconds": elapsed, "kept_on_disk": kept}  # fmt: skip
        if dropped + diverted > undelivered_before:
            log.error(
                f"stopped: events not delivered to their destination: {diverted} to a secondary, "
                f"{dropped} dropped (since start); {handed_off} handed off",
                extra=counts,
            )
            return EXIT_UNDELIVERED
        if kept:
            log.warning(
                f"stopped: {handed_off} events handed off; file buffers keep the rest on disk "
                "for the next start there (not dropped): " + "; ".join(kept),
                extra=counts,
            )
            return EXIT_OK
        log.info(
            f"stopped: every buffered event was delivered or handed off ({handed_off})",
            extra=counts,
        )
        return EXIT_OK

    async def watch_supervisor(self, supervisor: int) -> None:
        """A worker whose supervisor died (kill -9) stops gracefully rather than linger."""
        while not self._stopping:
            await asyncio.sleep(ORPHAN_CHECK_INTERVAL)
            if os.getppid() != supervisor:
                log.error("supervisor is gone: stopping")
                self.request_stop()


async def serve(
    config: Config,
    index: int = 0,
    listeners: Sequence[Listener] | None = None,
    ready_fd: int | None = None,
    workers: int = 1,
) -> int:
    worker = Worker(config, index, workers)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, worker.pipeline.flush_all)
    supervisor = process.supervisor_pid()
    if supervisor is not None:
        worker.supervised = True
        loop.add_signal_handler(signal.SIGUSR2, worker.force_stop)
        # Ctrl-C reaches the whole process group; the supervisor turns it into one SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        watchdog = loop.create_task(worker.watch_supervisor(supervisor))
    else:
        loop.add_signal_handler(signal.SIGINT, worker.request_stop)
    try:
        await worker.start(listeners)
    except (ValueError, OSError) as exc:  # a destination that cannot start: say why, plainly
        log.error(f"cannot start: {exc}")
        return EXIT_CONFIG
    tune_gc()
    open_files = raise_open_files_limit()
    connections = sum(s.max_connections for s in config.sources if isinstance(s, ForwardSource))
    if open_files < connections + OPEN_FILES_RESERVE:
        log.warning(
            "the open-files limit is below the forward inputs' max_connections: clients beyond "
            "it will be refused by the kernel (raise the container's nofile ulimit)",
            extra={"open_files_limit": open_files, "max_connections": connections},
        )
    log.info("ready", extra={"ports": worker.ports(), "pid": os.getpid(),
                             "open_files_limit": open_files})  # fmt: skip
    heartbeat = None
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        heartbeat = loop.create_task(beat(ready_fd))
    publisher = loop.create_task(publish_metrics())
    status = await worker.wait_stopped()
    publisher.cancel()
    if heartbeat is not None:
        heartbeat.cancel()
    metrics.publish_tallies()
    if supervisor is not None:
        watchdog.cancel()
    return status


async def beat(fd: int) -> None:
    """Tell the supervisor, on the ready pipe, that this worker's event loop still turns: a
    loop blocked by a bug or a pathological input stops the beats, and the supervisor restarts
    the worker (``worker_watchdog_timeout``)."""
    os.set_blocking(fd, False)  # never block the loop on a supervisor that reads late
    try:
        while True:
            with contextlib.suppress(BlockingIOError):
                os.write(fd, b".")
            await asyncio.sleep(process.HEARTBEAT_INTERVAL)
    except OSError:  # the supervisor is gone: watch_supervisor stops us
        return
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


async def publish_metrics() -> None:
    usage = metrics.ProcessUsage()
    while True:
        await asyncio.sleep(metrics.TALLY_PUBLISH_INTERVAL)
        metrics.publish_tallies()
        usage.publish()


GC_GEN0_THRESHOLD = 50_000
"""Container allocations between two young-generation collections (CPython's default: 700).
The data path allocates a few short-lived lists, dicts and tuples per event; at the default
threshold the cycle collector ran thousands of times a second, for garbage that reference
counting frees anyway."""


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (containers often start
    at 1,024): each client connection is one. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 1_048_576 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def tune_gc() -> None:
    """Move what start-up built (modules, config, clients) out of the collector's view, and
    collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def new_event_loop() -> asyncio.AbstractEventLoop:
    with contextlib.suppress(ImportError):
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def run(
    config: Config,
    index: int = 0,
    listeners: Sequence[Listener] | None = None,
    ready_fd: int | None = None,
    workers: int = 1,
) -> int:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(serve(config, index, listeners, ready_fd, workers))


def _listeners(spec: str) -> list[Listener]:
    """``[[tcp_fd, udp_fd_or_null], ...]``, one per source in config order."""
    out = []
    for tcp, udp in json.loads(spec):
        out.append(
            Listener(
                socket.socket(fileno=tcp),
                socket.socket(fileno=udp) if udp is not None else None,
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point the supervisor starts; not a user command."""
    parser = argparse.ArgumentParser(prog="python -m aggregator.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="how many the supervisor runs")
    parser.add_argument("--listeners", required=True)
    parser.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"aggregator worker {args.index}: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(config.server.log_level, worker=args.index)
    return run(config, args.index, _listeners(args.listeners), args.ready_fd, args.workers)


if __name__ == "__main__":
    raise SystemExit(main())
