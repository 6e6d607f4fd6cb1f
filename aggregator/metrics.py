"""Every metric the service exposes, by name, in one place.

Labels are names from the configuration (source, destination) or small fixed sets (reason,
error_code, outcome): never tags or anything else that grows with traffic.

With several workers, prometheus-client's multiprocess mode is on: the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` before any worker imports this module, each process writes its
own files there, and :func:`render` (on any worker) merges them into one view of the service.
Gauges say how they merge: ``livesum`` adds up what live workers hold, ``livemax`` takes the
worst live worker.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

from aggregator.process import METRICS_DIR_ENV

REGISTRY = CollectorRegistry(auto_describe=True)

# --- input ---
INPUT_EVENTS = Counter(
    "aggregator_input_events", "Events received, by source.", ["source"], registry=REGISTRY
)
INPUT_BYTES = Counter(
    "aggregator_input_bytes", "Bytes received on the wire, by source.", ["source"],
    registry=REGISTRY,
)  # fmt: skip
INPUT_ERRORS = Counter(
    "aggregator_input_errors",
    "Bad input (the connection or request is refused), by source and reason.",
    ["source", "reason"],
    registry=REGISTRY,
)
OPEN_CONNECTIONS = Gauge(
    "aggregator_open_connections", "Open client connections, by source.", ["source"],
    registry=REGISTRY, multiprocess_mode="livesum",
)  # fmt: skip
LIMITED_EVENTS = Counter(
    "aggregator_limited_events",
    "Events a tenant's limits refused (rate_limited, buffer_share, tag_too_long, "
    "event_too_large: not taken; the client sends again if it uses acks) or cut "
    "(event_truncated), by source, tenant (named in [limits.overrides], else other) and reason.",
    ["source", "tenant", "reason"],
    registry=REGISTRY,
)
TENANT_BYTES = Counter(
    "aggregator_tenant_bytes",
    "Bytes of events (as delivered) taken into buffers, by tenant (named in "
    "[limits.overrides], else other).",
    ["tenant"],
    registry=REGISTRY,
)
FILTER_EVENTS = Counter(
    "aggregator_filter_events",
    "What filters did to events, by filter and outcome: excluded (grep), invalid (parser: did "
    "not parse; dropped unless reserve_data), joined (concat: parts joined into one), let_go "
    "(concat: an incomplete line let go after flush_interval or past its memory).",
    ["filter", "outcome"],
    registry=REGISTRY,
)
FILTER_HELD_BYTES = Gauge(
    "aggregator_filter_held_bytes",
    "Bytes of the parts concat filters hold, waiting for the rest of their line (at most 64 MiB "
    "a filter a worker; looked at every second).",
    ["filter"], registry=REGISTRY, multiprocess_mode="livesum",
)  # fmt: skip
UNMATCHED_EVENTS = Counter(
    "aggregator_unmatched_events", "Events whose tag matched no route.", registry=REGISTRY
)

# --- buffers ---
BUFFER_BYTES = Gauge(
    "aggregator_buffer_bytes",
    "What buffered events hold against total_limit_size: memory for a memory buffer (JSON and "
    "bookkeeping), disk for a file buffer.",
    ["destination"], registry=REGISTRY, multiprocess_mode="livesum",
)  # fmt: skip
BUFFER_EVENTS = Counter(
    "aggregator_buffer_events",
    "Events appended to the destination's buffer (after filters and limits), by destination.",
    ["destination"], registry=REGISTRY,
)  # fmt: skip
BUFFER_DISK_BYTES = Gauge(
    "aggregator_buffer_disk_bytes", "Bytes of a file buffer's segment files.", ["destination"],
    registry=REGISTRY, multiprocess_mode="livesum",
)  # fmt: skip
BUFFER_SEGMENTS = Gauge(
    "aggregator_buffer_segments", "A file buffer's segment files.", ["destination"],
    registry=REGISTRY, multiprocess_mode="livesum",
)  # fmt: skip
BUFFER_REPLAYED_EVENTS = Counter(
    "aggregator_buffer_replayed_events",
    "Events read back from segment files an earlier process left (a restart, a crash, fewer "
    "workers than before).",
    ["destination"], registry=REGISTRY,
)  # fmt: skip
BUFFER_CORRUPT_EVENTS = Counter(
    "aggregator_buffer_corrupt_events",
    "Events lost to damaged segment files (a checksum that fails, a file cut short), estimated "
    "by their line ends; the damaged file is kept aside as *.damaged.",
    ["destination"], registry=REGISTRY,
)  # fmt: skip
BUFFER_WRITE_ERRORS = Counter(
    "aggregator_buffer_write_errors",
    "Writes to a file buffer that failed (disk full, I/O error): their events were not "
    "acknowledged and are counted in aggregator_dropped_events_total{reason=\"write_error\"}.",
    ["destination"], registry=REGISTRY,
)  # fmt: skip
BUFFER_KEPT_BYTES = Counter(
    "aggregator_buffer_kept_bytes",
    "Bytes a file buffer still held when its worker stopped: kept on disk for the next start "
    "on the same disk (not dropped, not delivered).",
    ["destination"], registry=REGISTRY,
)  # fmt: skip
BUFFER_CHUNKS = Gauge(
    "aggregator_buffer_chunks",
    "Chunks in a delivery attempt or waiting for their next one (at most 2 x "
    "flush_thread_count; the rest wait in the store).", ["destination"],
    registry=REGISTRY, multiprocess_mode="livesum",
)  # fmt: skip
BUFFER_FILL_RATIO = Gauge(
    "aggregator_buffer_fill_ratio",
    "Buffered bytes over total_limit_size, of the fullest worker.",
    ["destination"], registry=REGISTRY, multiprocess_mode="livemax",
)  # fmt: skip
LAST_SUCCESS = Gauge(
    "aggregator_last_success_timestamp_seconds",
    "When a delivery to the destination last succeeded (Unix time), any worker.",
    ["destination"], registry=REGISTRY, multiprocess_mode="max",
)  # fmt: skip
FLUSH_SECONDS = Histogram(
    "aggregator_flush_duration_seconds",
    "Time for one delivery attempt of one chunk.",
    ["destination"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
RETRIES = Counter(
    "aggregator_retries", "Delivery attempts scheduled again after a failure.", ["destination"],
    registry=REGISTRY,
)  # fmt: skip
OUTPUT_EVENTS = Counter(
    "aggregator_output_events", "Events delivered, by destination.", ["destination"],
    registry=REGISTRY,
)  # fmt: skip
OUTPUT_BYTES = Counter(
    "aggregator_output_bytes", "Encoded bytes delivered, by destination.", ["destination"],
    registry=REGISTRY,
)  # fmt: skip
DROPPED_EVENTS = Counter(
    "aggregator_dropped_events",
    "Events not delivered and not handed to a secondary destination, by destination and reason.",
    ["destination", "reason"],
    registry=REGISTRY,
)
HANDOFF_EVENTS = Counter(
    "aggregator_handoff_events",
    "Events a stopping worker could not deliver in time and handed off to [server] handoff "
    "(acknowledged by it), by destination.",
    ["destination"],
    registry=REGISTRY,
)
CONNECTIONS_REFUSED = Counter(
    "aggregator_connections_refused",
    "Connections closed on arrival because the worker had max_connections open, by source.",
    ["source"],
    registry=REGISTRY,
)
CONNECTIONS_CLOSED = Counter(
    "aggregator_connections_closed",
    "Client connections the server closed, by source and why (stop, max_age, idle) and how: "
    "reset (no acks used: RST right after a read), fin (after the last ack), forced (no safe "
    "moment came within drain_timeout).",
    ["source", "cause", "how"],
    registry=REGISTRY,
)
SECONDARY_EVENTS = Counter(
    "aggregator_secondary_events",
    "Events handed to the secondary destination, by destination and reason.",
    ["destination", "reason"],
    registry=REGISTRY,
)

# --- firehose ---
FIREHOSE_REQUESTS = Counter(
    "aggregator_firehose_requests",
    "PutRecordBatch calls, by destination and outcome (ok, partial, throttled, error).",
    ["destination", "outcome"],
    registry=REGISTRY,
)
FIREHOSE_FAILED_RECORDS = Counter(
    "aggregator_firehose_failed_records",
    "Records Firehose refused inside a successful call, by error code.",
    ["destination", "error_code"],
    registry=REGISTRY,
)


# --- process model ---
WORKERS_ALIVE = Gauge(
    "aggregator_workers_alive", "Worker processes running (set by the supervisor).",
    registry=REGISTRY, multiprocess_mode="livemax",
)  # fmt: skip
WORKER_WATCHDOG_KILLS = Counter(
    "aggregator_worker_watchdog_kills",
    "Workers killed because their event loop stopped turning (no heartbeat).",
    registry=REGISTRY,
)
WORKER_RESTARTS = Counter(
    "aggregator_worker_restarts", "Workers started again after they died.", registry=REGISTRY
)
# prometheus-client's own process_* metrics are per process and left out of the multiprocess
# view; these add up every process of the service (its supervisor and workers).
PROCESS_CPU_SECONDS = Counter(
    "aggregator_process_cpu_seconds",
    "CPU time (user and system) the service's processes used, summed over them.",
    registry=REGISTRY,
)
PROCESS_RESIDENT_BYTES = Gauge(
    "aggregator_process_resident_memory_bytes",
    "Resident memory of the service's live processes, summed over them.",
    registry=REGISTRY, multiprocess_mode="livesum",
)  # fmt: skip


class Tally:
    """A counter for the per-message path: kept in a plain int (``tally.pending += n``) and
    added to its Prometheus counter by :func:`publish_tallies`. In multiprocess mode every
    ``inc()`` is a getpid() system call and an mmap write, which per message cost more than
    the message."""

    __slots__ = ("_counter", "pending")

    def __init__(self, counter: Any) -> None:
        self._counter = counter
        self.pending = 0

    def publish(self) -> None:
        if self.pending:
            pending, self.pending = self.pending, 0
            self._counter.inc(pending)


_TALLIES: dict[int, Tally] = {}

TALLY_PUBLISH_INTERVAL = 0.5
"""Seconds between two publications of the tallies (the worker's loop does it)."""


def tally(counter: Any) -> Tally:
    """The one tally of a labelled counter child (the same child always gives the same)."""
    found = _TALLIES.get(id(counter))
    if found is None:
        found = _TALLIES[id(counter)] = Tally(counter)
    return found


def publish_tallies() -> None:
    for t in _TALLIES.values():
        t.publish()


class ProcessUsage:
    """This process's CPU time and resident memory, published into the two metrics above."""

    def __init__(self) -> None:
        self._cpu = 0.0
        self._page_size = os.sysconf("SC_PAGE_SIZE")

    def publish(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime
        if cpu > self._cpu:
            PROCESS_CPU_SECONDS.inc(cpu - self._cpu)
            self._cpu = cpu
        try:
            with open("/proc/self/statm", "rb") as statm:
                PROCESS_RESIDENT_BYTES.set(int(statm.read().split()[1]) * self._page_size)
        except (OSError, IndexError, ValueError):  # not Linux: the peak is what there is
            PROCESS_RESIDENT_BYTES.set(usage.ru_maxrss * 1024)


def multiprocess() -> bool:
    return bool(os.environ.get(METRICS_DIR_ENV))


def collect_registry() -> CollectorRegistry:
    """What /metrics shows: the merged view of every process, or this process alone."""
    if not multiprocess():
        return REGISTRY
    merged = CollectorRegistry()
    _multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
    return merged


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition of every metric, and its content type."""
    return generate_latest(collect_registry()), CONTENT_TYPE_LATEST


def values(name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The current samples of one metric (``name`` as exposed, e.g. with ``_total``), by labels,
    merged across processes."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in collect_registry().collect():
        for sample in family.samples:
            if sample.name == name:
                key = tuple(sorted(sample.labels.items()))
                out[key] = out.get(key, 0.0) + sample.value
    return out


def process_died(pid: int) -> None:
    """Forget a dead worker's live gauges (its counters stay: what it counted happened)."""
    if multiprocess():
        _multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
