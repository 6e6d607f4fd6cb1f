"""What one run measured, the checks made on it, and its JSON document.

Rates are over the measured window (first send to last delivery) and per-core figures divide
by the CPU time the aggregator used in it, so ``per_core_mb_per_s`` = ``mb_per_s`` ÷
``utilisation``: what one fully busy core delivers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.config import RunConfig
from benchmarks.loadgen import Progress

MB = 1_000_000
GB = 1_000_000_000
SCHEMA = 1


@dataclass
class RunResult:
    """The raw measurements; every derived figure is computed in :meth:`to_json`."""

    config: RunConfig
    started_at: str
    machine: dict[str, Any]
    sent: Progress
    delivered: dict[str, Any]
    """The sink's final counters (the emulator's stats)."""
    latency: dict[str, Any]
    window_s: float
    cpu_seconds: float
    baseline_rss: list[int]
    """Each worker's RSS before the load: what the process costs with empty buffers."""
    peak_rss: list[int]
    stall: dict[str, Any] | None
    aggregator_exit_status: int | None
    sink_cpu_seconds: float
    problems: list[str] = field(default_factory=list)
    timeline: list[dict[str, float]] = field(default_factory=list)
    """A sample about every second: seconds since the load began, events/s sent and
    delivered, cores busy, the largest worker RSS (bytes)."""
    json_path: Path | None = None
    profile_path: Path | None = None

    @property
    def delivered_events(self) -> int:
        return int(self.delivered["accepted_events"])

    @property
    def lost(self) -> int:
        return max(0, self.sent.events - self.delivered_events)

    @property
    def duplicated(self) -> int:
        return max(0, self.delivered_events - self.sent.events)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.all_problems)

    @property
    def exit_status(self) -> int:
        return 0 if self.ok else 1

    @property
    def all_problems(self) -> list[str]:
        problems = list(self.problems) + self.sent.errors
        if self.aggregator_exit_status != 0:
            problems.append(
                f"{self.config.subject} exited with status {self.aggregator_exit_status}"
            )
        if self.sent.ack_mismatches:
            problems.append(f"{self.sent.ack_mismatches} acks did not match their message")
        if self.stall is not None and self.stall["rss_within_bound"] is False:
            problems.append(
                "a worker's RSS grew beyond total_limit_size + its idle RSS + 48 MiB while stalled"
            )
        return problems

    def to_json(self) -> dict[str, Any]:
        window = self.window_s
        delivered_bytes = int(self.delivered["accepted_bytes"])
        events = self.delivered_events
        utilisation = self.cpu_seconds / window if window > 0 else None

        def per(value: float, unit: float) -> float | None:
            return value / unit if unit > 0 else None

        events_per_s = per(events, window)
        mb_per_s = per(delivered_bytes / MB, window)
        return {
            "schema": SCHEMA,
            "started_at": self.started_at,
            "config": self.config.to_json(),
            "machine": self.machine,
            "ok": self.ok,
            "exit_status": self.exit_status,
            "problems": self.all_problems,
            "sent": {
                "events": self.sent.events,
                "messages": self.sent.messages,
                "bytes": self.sent.bytes,
                "acks": self.sent.acks,
                "ack_mismatches": self.sent.ack_mismatches,
                "events_per_s": self.sent.events / self.config.duration,
            },
            "delivered": {
                "events": events,
                "bytes": delivered_bytes,
                "records": int(self.delivered["accepted_records"]),
                "events_per_s": events_per_s,
                "mb_per_s": mb_per_s,
            },
            "lost_events": self.lost,
            "duplicated_events": self.duplicated,
            "window_s": window,
            "cpu": {
                "seconds": self.cpu_seconds,
                "utilisation": utilisation,
                "seconds_per_million_events": per(self.cpu_seconds, events / 1e6),
                "seconds_per_gb": per(self.cpu_seconds, delivered_bytes / GB),
                "per_core_events_per_s": per(events, self.cpu_seconds),
                "per_core_mb_per_s": per(delivered_bytes / MB, self.cpu_seconds),
            },
            "memory": {
                "baseline_rss_bytes_per_worker": self.baseline_rss,
                "peak_rss_bytes_per_worker": self.peak_rss,
                "total_limit_bytes": self.config.total_limit_bytes,
            },
            "latency_ms": {
                "samples": self.latency["samples"],
                "p50": self.latency["p50_ms"],
                "p90": self.latency["p90_ms"],
                "p99": self.latency["p99_ms"],
                "max": self.latency["max_ms"],
            },
            "firehose": {
                "calls": self.delivered["calls"],
                "calls_per_s": per(self.delivered["calls"], window),
                "throttled_calls": self.delivered["throttled_calls"],
                "failed_records": self.delivered["failed_records"],
            },
            "stall": self.stall,
            "harness_cpu_seconds": {
                "load_generator": self.sent.cpu_seconds,
                "sink": self.sink_cpu_seconds,
            },
            "profile": None if self.profile_path is None else str(self.profile_path),
            "aggregator_exit_status": self.aggregator_exit_status,
            "timeline": self.timeline,
        }
