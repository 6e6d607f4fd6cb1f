"""``python -m benchmarks backlog``: a file buffer's backlog through a Firehose outage, a
restart, and the replay.

1. **Fill**: the sink refuses every call (an outage); acked PackedForward messages go to one
   worker with a file buffer until it holds ``--events`` events on disk. The worker's RSS is
   sampled all along.
2. **Hold**: the outage goes on for ``--hold`` seconds with the backlog on disk (RSS sampled).
3. **Stop**: SIGTERM; what cannot be delivered stays on disk.
4. **Replay**: a new process on the same directory, the outage over: how long until the sink
   holds every event (events/s), the worker's peak RSS meanwhile, and its CPU.

Exit status 1 when an event is missing or the worker's RSS passed the bound for a file buffer
(docs/durable-buffers.md, "Sizing"): 110 MiB + (2 x flush_thread_count + 1) x chunk_limit_size
x 2 + 3 x chunk_limit_size.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from aggregator.protocol import encode_packed_forward, new_chunk_id
from aggregator.stores.file import CHUNKS_UP
from benchmarks import procfs
from benchmarks.report import write_json
from benchmarks.service import SOURCES, Service, firehose_route
from benchmarks.sink import SinkProcess
from benchmarks.templates import make_record

MIB = 1024 * 1024
FLUSH_THREADS = 4
CHUNK = MIB
WORKER_OVERHEAD = 110 * MIB
BOUND = WORKER_OVERHEAD + (2 * FLUSH_THREADS + 1) * CHUNK * 2 + (CHUNKS_UP + 1) * CHUNK
"""The documented memory bound for a worker with one file buffer at these settings."""
EVENTS_PER_MESSAGE = 1000
SENDERS = 4
SAMPLE_EVERY = 0.5


def config_text(sink_url: str, path: Path, total_limit: int, stop_timeout: float) -> str:
    return f"""\
[server]
workers = 1
stop_timeout = "{stop_timeout:g}s"
drain_timeout = "1s"

{SOURCES}
{firehose_route(sink_url, settings='request_timeout = "30s"')}
[destinations.fh.buffer]
type = "file"
path = "{path}"
total_limit_size = {total_limit}
chunk_limit_size = {CHUNK}
flush_thread_count = {FLUSH_THREADS}
retry_wait = "200ms"
retry_max_interval = "1s"
"""


class _Sender(threading.Thread):
    """Acked PackedForward messages of EVENTS_PER_MESSAGE events until ``quota`` is taken."""

    def __init__(self, port: int, quota: int, event_size: int) -> None:
        super().__init__(daemon=True)
        self.port, self.quota, self.acked = port, quota, 0
        record = make_record(0, event_size, "1" * 19)
        self.entries = [[int(time.time()), record]] * EVENTS_PER_MESSAGE

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            unpacker = msgpack.Unpacker(raw=False)
            while self.acked < self.quota:
                n = min(EVENTS_PER_MESSAGE, self.quota - self.acked)
                chunk = new_chunk_id()
                sock.sendall(encode_packed_forward("app", self.entries[:n], chunk=chunk))
                while not any(reply.get("ack") == chunk for reply in unpacker):
                    data = sock.recv(4096)
                    if not data:
                        raise ConnectionResetError("closed before an ack")
                    unpacker.feed(data)
                self.acked += n


@dataclass
class Phase:
    seconds: float = 0.0
    peak_rss: int = 0
    cpu_seconds: float = 0.0
    events: int = 0
    disk_bytes: int = 0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


@dataclass
class Outcome:
    events: int
    event_size: int
    fill: Phase = field(default_factory=Phase)
    hold: Phase = field(default_factory=Phase)
    replay: Phase = field(default_factory=Phase)
    delivered: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 1 if self.problems else 0

    def render(self) -> str:
        rows = [
            ("backlog", f"{self.events:,} events of {self.event_size} B: "
                        f"{self.fill.disk_bytes / MIB:,.0f} MiB on disk"),
            ("fill (outage)", f"{self.fill.seconds:.1f} s, {self.fill.events_per_s:,.0f} ev/s, "
                              f"peak worker RSS {self.fill.peak_rss / MIB:,.0f} MiB"),
            ("hold (outage)", f"{self.hold.seconds:.0f} s, peak worker RSS "
                              f"{self.hold.peak_rss / MIB:,.0f} MiB"),
            ("replay", f"{self.replay.seconds:.1f} s, {self.replay.events_per_s:,.0f} ev/s "
                       f"({self.replay.events_per_s * self.event_size / MIB:,.1f} MiB/s), "
                       f"peak worker RSS {self.replay.peak_rss / MIB:,.0f} MiB, "
                       f"{self.replay.cpu_seconds:.1f} CPU-s"),
            ("delivered", f"{self.delivered:,} of {self.events:,}"),
            ("RSS bound", f"{BOUND / MIB:,.0f} MiB (docs/durable-buffers.md)"),
        ]  # fmt: skip
        lines = ["backlog: a file buffer through an outage, a restart and the replay", "-" * 78]
        lines += [f"{name:<14} {value}" for name, value in rows]
        lines += [f"!! {problem}" for problem in self.problems]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for name in ("fill", "hold", "replay"):
            doc[name]["events_per_s"] = getattr(self, name).events_per_s
        doc["rss_bound"] = BOUND
        doc["machine"] = procfs.machine()
        return doc


def _peak(service: Service, field: str = "VmRSS") -> int:
    """The worker's RSS now (VmRSS), or its highest yet (VmHWM)."""
    return max(service.worker_memory(field).values(), default=0)


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.seg"))


def run(events: int, event_size: int, hold: float, directory: Path | None = None,
        json_path: Path | None = None) -> Outcome:  # fmt: skip
    outcome = Outcome(events, event_size)
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as tmp:
        work = Path(tmp)
        path = (directory or work) / "buffer"
        sink = SinkProcess(["--port", "0", "--throttle-rate", "1"], work / "sink.log")
        try:
            total = max(64 * MIB, events * (event_size + 64) * 2)
            text = config_text(sink.url, path, total, stop_timeout=10)
            _fill_and_hold(outcome, sink, text, work / "first", path, hold)
            _replay(outcome, sink, text, work / "second", path)
        finally:
            sink.stop()
            if directory is not None:
                shutil.rmtree(path, ignore_errors=True)
    for phase in ("fill", "hold", "replay"):
        peak = getattr(outcome, phase).peak_rss
        if peak > BOUND:
            outcome.problems.append(f"{phase}: worker RSS {peak / MIB:,.0f} MiB, over the bound")
    if outcome.delivered < events:
        outcome.problems.append(f"LOST {events - outcome.delivered:,} events")
    if json_path is not None:
        write_json(outcome.to_json(), json_path)
    return outcome


def _fill_and_hold(
    outcome: Outcome, sink: SinkProcess, text: str, work: Path, path: Path, hold: float
) -> None:
    work.mkdir()
    service = Service.start(text, 1, work)
    try:
        cpu = service.cpu_seconds()
        started = time.monotonic()
        senders = [_Sender(service.forward_port, outcome.events // SENDERS
                           + (i < outcome.events % SENDERS), outcome.event_size)
                   for i in range(SENDERS)]  # fmt: skip
        for sender in senders:
            sender.start()
        fill = outcome.fill
        while any(s.is_alive() for s in senders):
            fill.peak_rss = max(fill.peak_rss, _peak(service))
            time.sleep(SAMPLE_EVERY)
        fill.seconds = time.monotonic() - started
        fill.peak_rss = max(fill.peak_rss, _peak(service, "VmHWM"))
        fill.events = sum(s.acked for s in senders)
        fill.cpu_seconds = service.cpu_seconds() - cpu
        fill.disk_bytes = _disk(path)
        if fill.events < outcome.events:
            outcome.problems.append(f"only {fill.events:,} events were acknowledged")
        held_until = time.monotonic() + hold
        while time.monotonic() < held_until:
            outcome.hold.peak_rss = max(outcome.hold.peak_rss, _peak(service))
            time.sleep(SAMPLE_EVERY)
        outcome.hold.seconds = hold
        outcome.hold.disk_bytes = _disk(path)
    finally:
        service.stop(timeout=30)
    if sink.stats()["accepted_events"]:
        outcome.problems.append("the sink took events during the outage")


def _replay(outcome: Outcome, sink: SinkProcess, text: str, work: Path, path: Path) -> None:
    work.mkdir()
    service = Service.start(text, 1, work)
    try:
        replay = outcome.replay
        cpu = service.cpu_seconds()
        started = time.monotonic()
        sink.configure(throttle_rate=0.0)
        deadline = started + max(120.0, outcome.events / 10_000)
        while True:
            replay.peak_rss = max(replay.peak_rss, _peak(service))
            delivered = int(sink.stats()["accepted_events"])
            if delivered >= outcome.events or time.monotonic() > deadline:
                break
            time.sleep(SAMPLE_EVERY / 5)
        replay.seconds = time.monotonic() - started
        replay.peak_rss = max(replay.peak_rss, _peak(service, "VmHWM"))
        replay.cpu_seconds = service.cpu_seconds() - cpu
        replay.events = outcome.delivered = delivered
        replay.disk_bytes = _disk(path)
    finally:
        service.stop(timeout=30)
