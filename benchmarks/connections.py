"""``python -m benchmarks connections``: what each open client connection costs a worker.

An aggregator behind a load balancer holds one connection per container that logs to it (Docker's
``fluentd`` driver keeps one open), most of them idle most of the time. This opens that many
forward connections to one worker, sends a burst of Docker-shaped messages on each, waits until
the worker has read every event, and reads its RSS with the connections left open and idle.
Events go to a null destination: what is measured is the input side, not a buffer.
"""

from __future__ import annotations

import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aggregator.protocol import encode_message
from benchmarks import procfs
from benchmarks.report import MIB
from benchmarks.service import SOURCES, Service
from benchmarks.templates import TIME_DIGITS, container_tag, make_record

CONFIG = f"""\
[server]
workers = 1
drain_quiet_period = "100ms"
drain_timeout = "2s"

{SOURCES}
[[routes]]
match = "**"
destination = "discard"

[destinations.discard]
type = "null"
"""


@dataclass(frozen=True)
class ConnectionsResult:
    connections: int
    events_per_connection: int
    burst_bytes: int
    """Bytes sent on each connection."""
    idle_rss: int
    """The worker's RSS before any connection, in bytes."""
    open_rss: int
    """Its RSS once every event was read, with every connection still open."""

    @property
    def per_connection(self) -> float:
        """Bytes of worker RSS per open, idle connection."""
        return (self.open_rss - self.idle_rss) / self.connections

    def render(self) -> str:
        return "\n".join(
            [
                f"connections        {self.connections:,}, each sent {self.burst_bytes:,} bytes "
                f"({self.events_per_connection:,} events) and stayed open",
                f"worker RSS idle    {self.idle_rss / MIB:,.1f} MiB",
                f"with connections   {self.open_rss / MIB:,.1f} MiB",
                f"per connection     {self.per_connection / 1024:,.1f} KiB",
            ]
        )


@dataclass(frozen=True)
class Burst:
    """What each connection sends: Message-mode events, back to back."""

    data: bytes
    events: int


def make_burst(burst_bytes: int, event_size: int = 300) -> Burst:
    """About ``burst_bytes`` of events whose JSON lines are ``event_size`` bytes (ValueError
    when that is too small for a Docker-shaped record)."""
    record = make_record(0, event_size, "0" * TIME_DIGITS)
    message = encode_message(container_tag(0), 1700000000, record)
    events = max(1, burst_bytes // len(message))
    return Burst(message * events, events)


def measure(connections: int, burst: Burst, timeout: float = 60.0) -> ConnectionsResult:
    """Start one worker, open ``connections`` connections that each send ``burst``, and
    measure. Raises TimeoutError when the worker has not read every event within ``timeout``
    seconds."""
    with tempfile.TemporaryDirectory(prefix="bench-connections-") as workdir:
        service = Service.start(CONFIG, workers=1, workdir=Path(workdir))
        try:
            (worker,) = service.worker_pids()
            idle_rss = procfs.status_bytes(worker, "VmRSS")
            socks: list[socket.socket] = []
            try:
                for _ in range(connections):
                    sock = socket.create_connection(("127.0.0.1", service.forward_port))
                    socks.append(sock)
                    sock.sendall(burst.data)
                _wait_until_read(service, connections * burst.events, timeout)
                open_rss = procfs.status_bytes(worker, "VmRSS")
            finally:
                for sock in socks:
                    sock.close()
        finally:
            service.stop()
    return ConnectionsResult(connections, burst.events, len(burst.data), idle_rss, open_rss)


def _wait_until_read(service: Service, events: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not service.has_finished(events):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker did not read all {events:,} events in {timeout:g} s")
        time.sleep(0.2)
