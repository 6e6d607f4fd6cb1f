"""Every metric the service exposes, by name, in one place.

Labels are names from the configuration (source, destination) or small fixed sets (reason,
error_code, outcome): never tags or anything else that grows with traffic.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

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
    registry=REGISTRY,
)  # fmt: skip
UNMATCHED_EVENTS = Counter(
    "aggregator_unmatched_events", "Events whose tag matched no route.", registry=REGISTRY
)

# --- buffers ---
BUFFER_BYTES = Gauge(
    "aggregator_buffer_bytes", "Bytes buffered (open, queued and in-flight chunks).",
    ["destination"], registry=REGISTRY,
)  # fmt: skip
BUFFER_CHUNKS = Gauge(
    "aggregator_buffer_chunks", "Chunks queued or in flight.", ["destination"], registry=REGISTRY
)
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


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition of every metric, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
