"""The supervisor: binds the ports once, runs N worker processes on them, and restarts the ones
that die. It does no data work.

Each worker gets its own ``SO_REUSEPORT`` socket per source, all bound to the same port, so the
kernel spreads new connections evenly across workers (a single shared accept queue lets one
busy worker take most of them). The supervisor keeps its copy of every socket open, so a
worker's port stays open, and connections queue, while that worker is restarted.

Signals: SIGTERM/SIGINT stop every worker gracefully (each closes its connections, flushes and
hands off, within ``stop_timeout``); a second one stops them at once (SIGUSR2 to each worker).
SIGUSR1 is passed on to every worker (flush now); a worker that receives ``POST /api/flush``
sends SIGUSR1 here so that every worker flushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aggregator import metrics, process
from aggregator.config.model import Config, ForwardSource
from aggregator.process import EXIT_CONFIG, EXIT_OK, EXIT_UNDELIVERED
from aggregator.sources import Listener
from aggregator.stopping import StopPlan

log = logging.getLogger(__name__)

RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 30.0
STABLE_UPTIME = 10.0
"""A worker that dies is restarted at once. One that dies again within this many seconds of its
start waits a backoff first, doubling each time: a worker that cannot start must not spin."""

FLUSH_COALESCE = 0.25
"""Seconds in which flush requests (SIGUSR1) are one fan-out to the workers: a storm of
/api/flush reaches every worker at once, and each asks here; an operator's signal a moment
later is a flush of its own."""


def _bind(kind: socket.SocketKind, host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(socket.SOMAXCONN)
    sock.set_inheritable(True)
    return sock


def bind_listeners(config: Config, workers: int) -> list[list[Listener]]:
    """Sockets for every worker slot and source: ``[slot][source]``. Port 0 picks one free port
    for the first slot, shared by the others."""
    slots: list[list[Listener]] = [[] for _ in range(workers)]
    for source in config.sources:
        port = source.port
        heartbeat = isinstance(source, ForwardSource) and source.heartbeat
        for slot in slots:
            tcp = _bind(socket.SOCK_STREAM, source.bind, port)
            port = tcp.getsockname()[1]
            udp = _bind(socket.SOCK_DGRAM, source.bind, port) if heartbeat else None
            slot.append(Listener(tcp, udp))
    return slots


@dataclass
class WorkerSlot:
    index: int
    listeners: list[Listener]
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    failures: int = 0  # consecutive early deaths
    exit_code: int | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_beat: float = 0.0


class _WorkerPipe(asyncio.Protocol):
    """A worker's ready pipe: "ready", then a byte every HEARTBEAT_INTERVAL while its event
    loop turns."""

    def __init__(self, slot: WorkerSlot, on_ready: Callable[[], None]) -> None:
        self._slot = slot
        self._on_ready = on_ready

    def data_received(self, data: bytes) -> None:
        slot = self._slot
        slot.last_beat = time.monotonic()
        if not slot.ready.is_set() and b"ready" in data:  # one write, smaller than PIPE_BUF
            slot.ready.set()
            self._on_ready()


def _stop_status(slot: WorkerSlot) -> int | None:
    """A worker's exit status for the summary. One stopped by SIGTERM before it was ready (its
    signal handlers were not installed yet) held no events: that is a clean stop."""
    code = slot.proc.returncode if slot.proc is not None else None
    if code == -signal.SIGTERM and not slot.ready.is_set():
        return EXIT_OK
    return code


class Supervisor:
    def __init__(self, config_path: str, config: Config, workers: int | None = None) -> None:
        self.config_path = config_path
        self.config = config
        self.workers = workers or config.server.workers
        self.slots: list[WorkerSlot] = []
        self._stopping = False
        self._stop_requested = 0.0
        self._last_flush = -FLUSH_COALESCE
        self._stop = asyncio.Event()
        self._state_dir = tempfile.mkdtemp(prefix="aggregator-")
        self._state_file = os.path.join(self._state_dir, "workers.json")
        self._supervising: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._fatal: int | None = None

    # --- running ----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGUSR1, self.flush_all)
        try:
            listeners = bind_listeners(self.config, self.workers)
        except OSError as exc:
            log.error(f"cannot listen: {exc}")
            return EXIT_UNDELIVERED
        self.slots = [WorkerSlot(i, slot) for i, slot in enumerate(listeners)]
        self._publish_state()
        self._supervising = [loop.create_task(self._supervise(slot)) for slot in self.slots]
        ready = loop.create_task(self._announce_ready())
        watchdog = loop.create_task(self._watch_workers())
        await self._stop.wait()
        ready.cancel()
        watchdog.cancel()
        return await self._shutdown()

    async def _announce_ready(self) -> None:
        await asyncio.gather(*(slot.ready.wait() for slot in self.slots))
        ports = {
            source.name: listener.tcp.getsockname()[1]
            for source, listener in zip(self.config.sources, self.slots[0].listeners, strict=True)
        }
        pids = [slot.proc.pid for slot in self.slots if slot.proc is not None]
        log.info("ready", extra={"ports": ports, "workers": len(self.slots), "pids": pids})

    async def _supervise(self, slot: WorkerSlot) -> None:
        """Keep one worker running until the stop."""
        backoff = 0.0
        while not self._stopping:
            await self._spawn(slot)
            assert slot.proc is not None
            if self._stopping:  # the stop came while it was starting: it missed the signal
                slot.proc.send_signal(signal.SIGTERM)
            code = await slot.proc.wait()
            slot.exit_code = code
            metrics.process_died(slot.proc.pid)
            self._publish_state()
            if self._stopping:
                return
            if code == EXIT_CONFIG and not slot.ready.is_set():
                # A worker that cannot start for its configuration will not start next time.
                log.error(f"worker {slot.index} cannot start (see its error above): stopping")
                self._fatal = EXIT_CONFIG
                self.request_stop()
                return
            uptime = time.monotonic() - slot.started
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            log.error(
                f"worker {slot.index} died ({how}) after {uptime:.1f} s; restarting",
                extra={"worker_index": slot.index, "pid": slot.proc.pid, "exit_code": code},
            )
            metrics.WORKER_RESTARTS.inc()
            if uptime >= STABLE_UPTIME:
                backoff = 0.0
            elif backoff:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff):
                        await self._stop.wait()
            backoff = min(max(backoff * 2, RESTART_BACKOFF_MIN), RESTART_BACKOFF_MAX)

    async def _spawn(self, slot: WorkerSlot) -> None:
        read_fd, write_fd = os.pipe()
        fds = [s.fileno() for lst in slot.listeners for s in (lst.tcp, lst.udp) if s is not None]
        spec = [[lst.tcp.fileno(), lst.udp.fileno() if lst.udp else None] for lst in slot.listeners]
        env = {
            **os.environ,
            process.SUPERVISOR_PID_ENV: str(os.getpid()),
            process.STATE_FILE_ENV: self._state_file,
        }
        slot.ready.clear()
        slot.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aggregator.worker",
            "--config",
            self.config_path,
            "--index",
            str(slot.index),
            "--workers",
            str(len(self.slots)),
            "--listeners",
            json.dumps(spec),
            "--ready-fd",
            str(write_fd),
            pass_fds=[*fds, write_fd],
            env=env,
        )
        os.close(write_fd)
        slot.started = time.monotonic()
        self._publish_state()
        waiter = asyncio.get_running_loop().create_task(self._await_ready(slot, read_fd))
        self._background.add(waiter)  # the loop holds tasks weakly
        waiter.add_done_callback(self._background.discard)

    async def _await_ready(self, slot: WorkerSlot, read_fd: int) -> None:
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: _WorkerPipe(slot, self._publish_state), pipe
        )

    async def _watch_workers(self) -> None:
        """Kill a serving worker whose beats stopped; _supervise starts it again. Publish the
        supervisor's CPU and memory on the way."""
        timeout = self.config.server.worker_watchdog_timeout
        usage = metrics.ProcessUsage()  # the supervisor's own share of the task's CPU and memory
        while not self._stopping:
            await asyncio.sleep(process.HEARTBEAT_INTERVAL)
            usage.publish()
            now = time.monotonic()
            for slot in self.slots:
                proc = slot.proc
                if proc is None or proc.returncode is not None or not slot.ready.is_set():
                    continue
                silent = now - slot.last_beat
                if silent > timeout and not self._stopping:
                    log.error(
                        f"worker {slot.index} has not answered for {silent:.0f} s (its event "
                        "loop is stuck): killing it to start it again",
                        extra={"worker_index": slot.index, "pid": proc.pid},
                    )
                    metrics.WORKER_WATCHDOG_KILLS.inc()
                    slot.last_beat = now
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()

    def _alive(self) -> int:
        """Workers running and serving."""
        return sum(
            1
            for s in self.slots
            if s.proc is not None and s.proc.returncode is None and s.ready.is_set()
        )

    def _publish_state(self) -> None:
        alive = self._alive()
        process.write_state(self._state_file, {"expected": len(self.slots), "alive": alive})
        metrics.WORKERS_ALIVE.set(alive)

    # --- signals ----------------------------------------------------------------------------

    def _signal_workers(self, sig: int) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    def flush_all(self) -> None:
        """Have every worker flush; requests within FLUSH_COALESCE of the last fan-out are one
        flush (every worker that took an /api/flush asks here)."""
        now = time.monotonic()
        if now - self._last_flush < FLUSH_COALESCE:
            return
        self._last_flush = now
        self._signal_workers(signal.SIGUSR1)

    def request_stop(self) -> None:
        if self._stopping:
            log.error("second stop signal: stopping every worker at once; buffered events are lost")
            self._signal_workers(signal.SIGUSR2)
            return
        log.info("stop signal: stopping every worker gracefully")
        self._stop_requested = time.monotonic()
        self._stopping = True
        self._stop.set()

    async def _shutdown(self) -> int:
        # Our copies of the sockets would keep the ports open after the workers close theirs.
        for slot in self.slots:
            for listener in slot.listeners:
                listener.tcp.close()
                if listener.udp is not None:
                    listener.udp.close()
        self._signal_workers(signal.SIGTERM)
        # The platform kills us stop_timeout after its SIGTERM: kill first, to say so.
        limit = self._stop_requested + StopPlan.supervisor_limit(self.config.server)
        procs = [s.proc for s in self.slots if s.proc is not None]
        try:
            async with asyncio.timeout(max(0.0, limit - time.monotonic())):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            log.error("workers did not stop before the kill timer (stop_timeout): killing them")
            self._signal_workers(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))
        for task in self._supervising:
            task.cancel()
        status = self._summary([_stop_status(slot) for slot in self.slots])
        return self._fatal if self._fatal is not None else status

    def _summary(self, codes: list[int | None]) -> int:
        dropped = sum(metrics.values("aggregator_dropped_events_total").values())
        diverted = sum(metrics.values("aggregator_secondary_events_total").values())
        delivered = sum(metrics.values("aggregator_output_events_total").values())
        handed_off = sum(metrics.values("aggregator_handoff_events_total").values())
        kept = int(sum(metrics.values("aggregator_buffer_kept_bytes_total").values()))
        fields = {
            "delivered": int(delivered),
            "handed_off": int(handed_off),
            "to_secondary": int(diverted),
            "dropped": int(dropped),
            "kept_on_disk_bytes": kept,
            "exit_codes": codes,
        }
        if all(code == EXIT_OK for code in codes):
            on_disk = (
                f"; {kept} bytes kept on disk by file buffers for the next start there"
                if kept else ""
            )  # fmt: skip
            log.info(
                f"stopped: {int(delivered)} events delivered, {int(handed_off)} handed off, "
                f"none lost on the way out{on_disk}",
                extra=fields,
            )
            return EXIT_OK
        killed = " (killed: their buffered events are lost and not counted)" if any(
            code == -signal.SIGKILL for code in codes
        ) else ""
        log.error(
            f"stopped with undelivered events: {int(diverted)} went to a secondary destination, "
            f"{int(dropped)} were dropped, {int(handed_off)} handed off (workers' exit codes "
            f"{codes}){killed}",
            extra=fields,
        )
        return EXIT_UNDELIVERED

    def cleanup(self) -> None:
        shutil.rmtree(self._state_dir, ignore_errors=True)
        process.remove_metrics_dir()


def run(config_path: str, config: Config, workers: int | None = None) -> int:
    """Run the service in the foreground until stopped; the exit status."""
    supervisor = Supervisor(config_path, config, workers)
    try:
        return asyncio.run(supervisor.run())
    finally:
        supervisor.cleanup()
