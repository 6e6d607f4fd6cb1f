"""One benchmark run's settings, checked once, shared by the command line, the runner and tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aggregator.config.units import parse_duration, parse_size
from benchmarks.templates import MODES, Mode, make_record

SUBJECTS = ("aggregator", "fluent-bit")
BUFFERS = ("memory", "file")
FILTERS = ("grep", "record_transformer", "parser", "docker_partials")
"""Filters a run can put before the route (benchmarks/service.py says what each does)."""
"""What a run can measure: this project, or a peer under the identical load (benchmarks/peer.py)."""
DRAIN_GRACE = 30.0
"""Seconds, beyond one flush interval, that the runner waits for the last events to arrive."""


@dataclass(frozen=True)
class RunConfig:
    workers: int = 1
    mode: Mode = "message"
    batch: int = 100
    """Events per message in forward and packed modes (message mode sends one)."""
    event_size: int = 300
    """Bytes of each event's JSON line as delivered, newline included."""
    connections: int = 16
    senders: int = 0
    """Load generator processes; 0: one per core the aggregator's workers leave free (min 1)."""
    ack: bool = False
    rate: float = 0.0
    """Events per second over all connections; 0: as fast as the aggregator takes them."""
    fleet: bool = False
    """The shape of an ECS cluster behind an NLB: every message in its own write(), as
    Docker's driver sends; meant with hundreds of --connections and a --rate."""
    duration: float = 10.0
    aggregate: bool = False
    flush_interval: str = "1s"
    chunk_limit: str = "1MiB"
    total_limit: str = "256MiB"
    flush_threads: int = 8
    buffer: str = "memory"
    """The aggregator's buffer type: memory, or file (in the run's temporary directory)."""
    limits: bool = False
    """[limits] on, never limiting (to measure what counting costs)."""
    filters: tuple[str, ...] = ()
    """Filters every event goes through, in this order (each keeps every event)."""
    trickle_read_delay: str = "50ms"
    """The forward input's trickle_read_delay (its default; 0s: every write read at once)."""
    source: Path | None = None
    """Another checkout whose ``aggregator`` package runs instead (a before/after)."""
    stall_at: float | None = None
    """Seconds into the load at which the sink stops answering (with ``stall_for``)."""
    stall_for: float | None = None
    fail_rate: float = 0.0
    throttle_rate: float = 0.0
    sink_latency: float = 0.0
    lose_records: int = 0
    """Records the sink acknowledges and discards: proves that loss is detected."""
    sample_every: int = 50
    drain_timeout: float | None = None
    """Longest wait for the last events after the load ends; None: flush interval + 30 s."""
    json_path: Path | None = None
    """Where the result goes; None: benchmarks/results/<timestamp>-<mode>.json."""
    profile: bool = False
    """cProfile the workers (slower figures; a report of where the time goes)."""
    subject: str = "aggregator"
    """What is measured: the aggregator, or a peer (fluent-bit) with the same load and sink."""
    peer_bin: Path | None = None
    """The peer's executable; None: the workplace's build (benchmarks/peer.py)."""

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ValueError("; ".join(problems))

    def _problems(self) -> Iterator[str]:
        if self.mode not in MODES:
            yield f"mode must be one of {', '.join(MODES)}"
        if self.subject not in SUBJECTS:
            yield f"subject must be one of {', '.join(SUBJECTS)}"
        if self.buffer not in BUFFERS:
            yield f"buffer must be one of {', '.join(BUFFERS)}"
        for kind in self.filters:
            if kind not in FILTERS:
                yield f"filters are {', '.join(FILTERS)}, not {kind!r}"
        if self.subject != "aggregator" and (
            self.profile or self.aggregate or self.buffer != "memory" or self.limits
            or self.filters or self.source
        ):
            yield (
                "--profile, --aggregate, --buffer, --limits, --filters and source are the "
                "aggregator's; a peer runs without them"
            )
        for name in ("workers", "batch", "connections", "flush_threads", "sample_every"):
            if getattr(self, name) < 1:
                yield f"{name} must be at least 1"
        for name in ("senders", "rate", "fail_rate", "throttle_rate", "sink_latency"):
            if getattr(self, name) < 0:
                yield f"{name} must not be negative"
        if self.lose_records < 0:
            yield "lose_records must not be negative"
        if self.duration <= 0:
            yield "duration must be positive"
        if self.fleet and (self.mode != "message" or self.rate <= 0):
            yield "--fleet is message mode at a set --rate (a few hundred lines/s a connection)"
        if not (self.fail_rate <= 1 and self.throttle_rate <= 1):
            yield "fail and throttle rates are probabilities (0 to 1)"
        for name in ("flush_interval", "trickle_read_delay"):
            try:
                parse_duration(getattr(self, name))
            except ValueError as exc:
                yield str(exc)
        for name in ("chunk_limit", "total_limit"):
            try:
                parse_size(getattr(self, name))
            except ValueError as exc:
                yield str(exc)
        try:
            make_record(0, self.event_size, "0" * 19)
        except ValueError as exc:
            yield str(exc)
        if (self.stall_at is None) != (self.stall_for is None):
            yield "stall_at and stall_for go together"
        elif self.stall_at is not None and self.stall_for is not None:
            if self.stall_at < 0 or self.stall_for <= 0:
                yield "stall_at must not be negative and stall_for must be positive"
            elif self.stall_at + self.stall_for >= self.duration:
                yield "the stall must end before the load does (stall_at + stall_for < duration)"

    @property
    def events_per_message(self) -> int:
        return 1 if self.mode == "message" else self.batch

    @property
    def sender_processes(self) -> int:
        if self.senders:
            return min(self.senders, self.connections)
        spare = len(os.sched_getaffinity(0)) - self.workers
        return max(1, min(spare, self.connections))

    @property
    def flush_interval_s(self) -> float:
        return parse_duration(self.flush_interval)

    @property
    def total_limit_bytes(self) -> int:
        return parse_size(self.total_limit)

    @property
    def drain_timeout_s(self) -> float:
        if self.drain_timeout is not None:
            return self.drain_timeout
        return self.flush_interval_s + DRAIN_GRACE

    @property
    def stall(self) -> tuple[float, float] | None:
        if self.stall_at is None or self.stall_for is None:
            return None
        return self.stall_at, self.stall_for

    def to_json(self) -> dict[str, Any]:
        settings = asdict(self)
        settings["json_path"] = None if self.json_path is None else str(self.json_path)
        settings["peer_bin"] = None if self.peer_bin is None else str(self.peer_bin)
        settings["source"] = None if self.source is None else str(self.source)
        settings["filters"] = list(self.filters)
        settings["senders"] = self.sender_processes
        settings["events_per_message"] = self.events_per_message
        return settings
