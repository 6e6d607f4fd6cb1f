"""The load generator: sender processes, each driving its share of the TCP connections.

It must never be what limits a run, so it does almost nothing per event: a message is a
:class:`~benchmarks.templates.MessageTemplate` stamped with the send time, and without acks
the same stamped message is repeated into ~64 KiB writes (one ``stamp`` per write, not per
event). With acks a connection sends one message and waits for its ack before the next, which
is what Docker's fluentd driver does with ``fluentd-request-ack``.

Rates are paced per connection in small time slices; a connection that falls behind catches up
in full-size writes, so a rate the server cannot take turns into "as fast as it takes".
Each process reports its running totals to the parent over a queue several times a second.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any, Literal

import msgpack

from benchmarks import eventloop
from benchmarks.templates import CONTAINERS, ChunkIds, MessageTemplate, Mode

WRITE_BYTES = 64 * 1024
"""Messages are repeated into writes of about this size when there are no acks."""
SLICE = 0.005
"""The shortest sleep of a paced connection: it then sends everything that became due."""
REPORT_EVERY = 0.1
UNPACED = sys.maxsize
"""Messages "due" when there is no rate: as many as the writes and the server take."""
CLOSE_TIMEOUT = 60.0
"""After the load: how long a connection may take to hand its last bytes to the kernel, or a
last ack to arrive (the aggregator may be blocked on a full buffer)."""


@dataclass(frozen=True)
class LoadSpec:
    host: str
    port: int
    mode: Mode
    events_per_message: int
    event_size: int
    connections: int
    senders: int
    ack: bool
    rate: float
    """Events per second over every connection; 0: as fast as the server takes them."""
    duration: float
    one_per_write: bool = False
    """Each message in a write() of its own, as Docker's driver sends (the fleet shape):
    the server pays its per-read costs for every message."""


@dataclass
class Progress:
    """Totals of one sender process (or, summed, of all)."""

    events: int = 0
    messages: int = 0
    bytes: int = 0
    acks: int = 0
    ack_mismatches: int = 0
    cpu_seconds: float = 0.0
    """The sender processes' own CPU time, to show they were not the bottleneck."""
    errors: list[str] = field(default_factory=list)

    def __add__(self, other: Progress) -> Progress:
        return Progress(
            self.events + other.events,
            self.messages + other.messages,
            self.bytes + other.bytes,
            self.acks + other.acks,
            self.ack_mismatches + other.ack_mismatches,
            self.cpu_seconds + other.cpu_seconds,
            self.errors + other.errors,
        )


Phase = Literal["connected", "running", "done"]
Report = tuple[int, Phase, Progress]
"""What a sender process puts on the queue: its index, where it is, its totals so far."""


class _Connection:
    """One TCP connection pretending to be one container's log driver."""

    def __init__(self, index: int, spec: LoadSpec, progress: Progress, stop: Event) -> None:
        self.index = index
        self.spec = spec
        self.template = MessageTemplate(
            spec.mode, index % CONTAINERS, spec.events_per_message, spec.event_size, spec.ack
        )
        self.rate = spec.rate / spec.connections
        self.progress = progress
        self.stop = stop
        self.sock = socket.create_connection((spec.host, spec.port), timeout=10)
        self.sock.settimeout(None)

    async def run(self, deadline: float) -> None:
        reader, writer = await asyncio.open_connection(sock=self.sock)
        try:
            if self.spec.ack:
                await self._send_acked(reader, writer, deadline)
            else:
                await self._send(writer, deadline)
        except (OSError, EOFError, TimeoutError) as exc:
            self.progress.errors.append(f"connection {self.index}: {exc!r}")
            writer.transport.abort()
            return
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            unsent = writer.transport.get_write_buffer_size()
            self.progress.errors.append(
                f"connection {self.index}: {unsent} bytes not sent at the end ({exc!r})"
            )
            writer.transport.abort()

    async def _due(self, sent_messages: int, started: float, deadline: float) -> int:
        """Messages this connection may send now (0 after the end); sleeps until some are."""
        loop = asyncio.get_running_loop()
        per_message = self.template.events
        while True:
            now = loop.time()
            if now >= deadline or self.stop.is_set():
                return 0
            if self.rate <= 0:
                return UNPACED
            due = int((now - started) * self.rate / per_message) - sent_messages
            if due > 0:
                return due
            next_at = started + (sent_messages + 1) * per_message / self.rate
            await asyncio.sleep(min(max(next_at - now, SLICE), deadline - now))

    async def _send(self, writer: asyncio.StreamWriter, deadline: float) -> None:
        template, progress = self.template, self.progress
        per_write = max(1, WRITE_BYTES // template.size)
        started = asyncio.get_running_loop().time()
        sent = 0
        while due := await self._due(sent, started, deadline):
            if self.spec.one_per_write:  # the fleet shape: each message a write() of its own
                n = due
                for _ in range(n):
                    writer.write(template.stamp(time.time_ns()))
            else:
                n = min(due, per_write)
                writer.write(template.stamp(time.time_ns()) * n)
            sent += n
            progress.messages += n
            progress.events += n * template.events
            progress.bytes += n * template.size
            await writer.drain()  # waits only while the kernel's send buffer is full

    async def _send_acked(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, deadline: float
    ) -> None:
        template, progress = self.template, self.progress
        unpacker = msgpack.Unpacker(raw=False)
        chunk_ids = ChunkIds()
        started = asyncio.get_running_loop().time()
        sent = 0
        while await self._due(sent, started, deadline):
            chunk = next(chunk_ids)
            data = template.stamp(time.time_ns(), chunk)
            writer.write(data)
            sent += 1
            progress.messages += 1
            progress.events += template.events
            progress.bytes += len(data)
            # The wait may span a stalled sink: only bound it once the load is over.
            timeout = max(deadline - asyncio.get_running_loop().time(), 0) + CLOSE_TIMEOUT
            reply = await asyncio.wait_for(_next_reply(reader, unpacker), timeout)
            progress.acks += 1
            if not (isinstance(reply, dict) and reply.get("ack") == chunk.decode()):
                progress.ack_mismatches += 1


async def _next_reply(reader: asyncio.StreamReader, unpacker: Any) -> Any:
    while True:
        try:
            return next(unpacker)
        except StopIteration:
            pass
        data = await reader.read(65536)
        if not data:
            raise EOFError("the server closed the connection while an ack was awaited")
        unpacker.feed(data)


async def _drive(
    index: int,
    connections: list[_Connection],
    spec: LoadSpec,
    out: Queue[Report],
    progress: Progress,
) -> None:
    deadline = asyncio.get_running_loop().time() + spec.duration

    async def report() -> None:
        while True:
            out.put((index, "running", replace(progress, errors=list(progress.errors))))
            await asyncio.sleep(REPORT_EVERY)

    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(c.run(deadline) for c in connections))
    finally:
        reporter.cancel()


def sender_main(
    index: int,
    spec: LoadSpec,
    out: Queue[Report],
    go: Event,
    stop: Event,
    connection_ids: list[int],
) -> None:
    """One sender process: connect, say so, wait for the start, send, report the totals."""
    progress = Progress()
    try:
        connections = [_Connection(c, spec, progress, stop) for c in connection_ids]
    except OSError as exc:
        progress.errors.append(f"sender {index} cannot connect: {exc!r}")
        out.put((index, "done", progress))
        return
    out.put((index, "connected", progress))
    go.wait()
    if not stop.is_set():
        try:
            eventloop.run(_drive(index, connections, spec, out, progress))
        except Exception as exc:  # reported, so that the runner says why instead of hanging
            progress.errors.append(f"sender {index}: {exc!r}")
    progress.cpu_seconds = time.process_time()
    out.put((index, "done", progress))


class LoadGenerator:
    """The parent's handle on the sender processes."""

    def __init__(self, spec: LoadSpec) -> None:
        # spawn, not fork: the parent may hold threads (a test's emulator, urllib's pools).
        ctx = multiprocessing.get_context("spawn")
        self.spec = spec
        self._queue: Queue[Report] = ctx.Queue()
        self._go = ctx.Event()
        self._stop = ctx.Event()
        self._latest: dict[int, Progress] = {}
        self._phases: dict[int, Phase] = {}
        self._processes = [
            ctx.Process(
                target=sender_main,
                args=(
                    i,
                    spec,
                    self._queue,
                    self._go,
                    self._stop,
                    list(range(i, spec.connections, spec.senders)),
                ),
                name=f"bench-sender-{i}",
                daemon=True,
            )
            for i in range(spec.senders)
        ]

    def connect(self, timeout: float = 30.0) -> None:
        """Start the processes and return once every connection is open."""
        for process in self._processes:
            process.start()
        deadline = time.monotonic() + timeout
        while any(self._phases.get(i) is None for i in range(len(self._processes))):
            self._receive(0.1)
            self._note_dead()
            if time.monotonic() > deadline:
                raise TimeoutError("the load generator did not connect in time")
        errors = self.totals().errors
        if errors:
            raise ConnectionError("; ".join(errors))

    def start(self) -> None:
        self._go.set()

    def poll(self) -> Progress:
        """The latest totals, after reading whatever the senders reported."""
        self._receive(0)
        return self.totals()

    def totals(self) -> Progress:
        total = Progress()
        for progress in self._latest.values():
            total += progress
        return total

    @property
    def finished(self) -> bool:
        self._note_dead()
        return all(self._phases.get(i) == "done" for i in range(len(self._processes)))

    def wait(self, timeout: float) -> Progress:
        """The final totals once every sender is done (or what is known at ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not self.finished and time.monotonic() < deadline:
            self._receive(min(0.2, max(0.0, deadline - time.monotonic())))
        self.close()
        return self.totals()

    def close(self) -> None:
        """Stop (if still sending) and reap every process."""
        self._stop.set()
        self._go.set()
        for process in self._processes:
            if process.pid is None:
                continue
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()

    def _note_dead(self) -> None:
        """A sender that exited without saying it was done (killed, crashed) is done, with
        an error, so that nobody waits for it."""
        for i, process in enumerate(self._processes):
            if self._phases.get(i) == "done" or process.exitcode is None:
                continue
            self._receive(0)  # its last report may still be in the pipe
            if self._phases.get(i) != "done":
                self._phases[i] = "done"
                self._latest.setdefault(i, Progress()).errors.append(
                    f"sender {i} exited with status {process.exitcode} before reporting"
                )

    def _receive(self, timeout: float) -> None:
        try:
            item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            while True:
                index, phase, progress = item
                if self._phases.get(index) != "done":
                    self._phases[index] = phase
                    self._latest[index] = progress
                item = self._queue.get_nowait()
        except queue.Empty:
            return
