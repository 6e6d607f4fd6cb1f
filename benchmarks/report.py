"""How a run is shown: a progress line while it runs, then a table and a JSON file."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, TextIO

import orjson

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024


class ProgressLine:
    """One line rewritten in place on a terminal; plain lines anywhere else (logs, CI)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._width = 0

    def show(self, text: str) -> None:
        if self.tty:
            self.out.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def end(self) -> None:
        if self.tty and self._width:
            self.out.write("\n")
            self.out.flush()
        self._width = 0


def default_json_path(mode: str, now: float | None = None, subject: str = "aggregator") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    suffix = "" if subject == "aggregator" else f"-{subject}"
    return RESULTS_DIR / f"{stamp}-{mode}{suffix}.json"


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")


def _n(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:,.0f} MiB"


def label(config: dict[str, Any]) -> str:
    """What was measured, in a few words: the peer, or the aggregator and its buffer."""
    subject: str = config.get("subject", "aggregator")
    if subject != "aggregator":
        return subject
    notes = [f"{config['buffer']} buffer"] if config.get("buffer", "memory") != "memory" else []
    notes += ["limits"] if config.get("limits") else []
    notes += [f"filters {'+'.join(config['filters'])}"] if config.get("filters") else []
    notes += [f"code of {Path(config['source']).name}"] if config.get("source") else []
    return f"{subject} ({', '.join(notes)})" if notes else subject


def describe(config: dict[str, Any]) -> str:
    """The run's shape in one line."""
    mode = config["mode"]
    if mode != "message":
        mode += f" ({config['events_per_message']} events/message)"
    rate = "as fast as taken" if not config["rate"] else f"{config['rate']:,.0f} ev/s"
    workers = f"{config['workers']} worker" + ("s" if config["workers"] > 1 else "")
    if config.get("fleet"):
        mode += ", fleet: a write per message"
    parts = [
        label(config),
        mode,
        workers,
        f"{config['connections']} connections",
        f"{config['event_size']} B events",
        "acks" if config["ack"] else "no acks",
        "aggregated records" if config["aggregate"] else "one event per record",
        rate,
        f"{config['duration']:g} s",
    ]
    return ", ".join(parts)


def verdict(result: dict[str, Any]) -> str:
    sent, received = result["sent"]["events"], result["delivered"]["events"]
    if result["lost_events"]:
        return (
            f"LOST {result['lost_events']:,} events: sent {sent:,}, the sink received {received:,}"
        )
    if result["duplicated_events"]:
        return (
            f"DUPLICATED {result['duplicated_events']:,} events: "
            f"sent {sent:,}, the sink received {received:,}"
        )
    return "every event delivered"


def _overhead(result: dict[str, Any]) -> str:
    """What a worker holds beyond its buffer limit at its peak, and idle before the load: the
    fixed overhead to add to total_limit_size when sizing memory."""
    memory = result["memory"]
    peak = max(memory["peak_rss_bytes_per_worker"], default=None)
    idle = max(memory["baseline_rss_bytes_per_worker"], default=None)
    limit = memory.get("total_limit_bytes")
    if peak is None or not limit or result["config"].get("subject", "aggregator") != "aggregator":
        return "n/a"
    if peak <= limit:
        return f"peak under total_limit_size {_mib(limit)} (buffers never full); idle {_mib(idle)}"
    over = (peak - limit) / MIB
    return f"peak = total_limit_size {_mib(limit)} + {over:,.0f} MiB; idle {_mib(idle)}"


def _rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    sent, delivered, cpu = result["sent"], result["delivered"], result["cpu"]
    latency, firehose = result["latency_ms"], result["firehose"]
    harness = result["harness_cpu_seconds"]
    peaks = ", ".join(map(_mib, result["memory"]["peak_rss_bytes_per_worker"]))
    calls = f"{_n(firehose['calls_per_s'], 1)} calls/s"
    percentiles = f"p50 {_n(latency['p50'])} ms  p99 {_n(latency['p99'])} ms"
    return [
        ("sent", f"{sent['events']:,} events in {sent['messages']:,} messages"),
        ("delivered", f"{delivered['events']:,} events in {delivered['records']:,} records"),
        ("check", verdict(result)),
        ("window", f"{result['window_s']:.1f} s (first send to last delivery)"),
        ("send rate", f"{_n(sent['events_per_s'])} events/s"),
        ("throughput", _rates(delivered["events_per_s"], delivered["mb_per_s"])),
        ("PutRecordBatch", f"{calls} ({firehose['calls']:,} calls)"),
        ("CPU", f"{cpu['seconds']:.2f} s, {_n(cpu['utilisation'], 2)} cores busy"),
        ("CPU per 1M events", f"{_n(cpu['seconds_per_million_events'], 2)} s"),
        ("CPU per GB", f"{_n(cpu['seconds_per_gb'], 1)} s"),
        ("per core", _rates(cpu["per_core_events_per_s"], cpu["per_core_mb_per_s"])),
        ("peak RSS/worker", peaks or "n/a"),
        ("RSS overhead", _overhead(result)),
        ("latency", f"{percentiles}  ({latency['samples']:,} samples)"),
        (
            "harness CPU",
            f"load generator {harness['load_generator']:.2f} s, sink {harness['sink']:.2f} s",
        ),
    ]


def _rates(events_per_s: float | None, mb_per_s: float | None) -> str:
    return f"{_n(events_per_s)} events/s  {_n(mb_per_s, 2)} MB/s"


def _optional_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    config, sent, firehose = result["config"], result["sent"], result["firehose"]
    rows = []
    if config["ack"]:
        rows.append(("acks", f"{sent['acks']:,} received, {sent['ack_mismatches']:,} wrong"))
    if config["fail_rate"] or config["throttle_rate"] or config["sink_latency"]:
        throttled, failed = firehose["throttled_calls"], firehose["failed_records"]
        rows.append(("sink faults", f"{throttled:,} throttled calls, {failed:,} failed records"))
    stall = result["stall"]
    if stall is not None:
        bound = {True: "within", False: "OVER", None: "n/a"}[stall["rss_within_bound"]]
        limit = _mib(stall["total_limit_bytes"])
        rows += [
            ("stall", f"sink stalled {stall['at_s']:g} s into the load, for {stall['for_s']:g} s"),
            (
                "  max worker RSS",
                f"{_mib(stall['max_worker_rss_bytes'])}: {bound} {_mib(stall['rss_bound_bytes'])}"
                f" = total_limit_size {limit} + idle {_mib(stall['idle_rss_bytes'])} + 48 MiB",
            ),
            ("  send rate", f"{_n(stall['send_rate_events_per_s'])} events/s over the stall"),
            ("  at its end", f"{_n(stall['settled_send_rate_events_per_s'])} events/s"),
        ]
    return rows


def table(result: dict[str, Any]) -> str:
    """The terminal summary of a result (the same figures as its JSON)."""
    rows = _rows(result) + _optional_rows(result)
    rows.append(("exit status", str(result["aggregator_exit_status"])))
    width = max(len(name) for name, _ in rows)
    lines = [f"benchmark: {describe(result['config'])}", "-" * 78]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    lines += [f"!! {problem}" for problem in result["problems"]]
    if result["lost_events"] or result["duplicated_events"]:
        lines.append(verdict(result))
    return "\n".join(lines)


def pairs_summary(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    """The CPU ratio of every pair of runs, and their median: the figure to quote."""
    names = f"{label(pairs[0][0]['config'])} / {label(pairs[0][1]['config'])}"
    key = "seconds_per_million_events"
    # A run too short for one clock tick of CPU measures nothing: it has no ratio.
    ratios = [ours["cpu"][key] / peer["cpu"][key] for ours, peer in pairs if peer["cpu"][key]]
    if not ratios:
        return f"{len(pairs)} pairs ({names}): no measurable CPU; no ratio"
    each = ", ".join(f"{r:.2f}x" for r in ratios)
    return (
        f"{len(pairs)} pairs, {names} CPU-s per million events: {each}\n"
        f"median {statistics.median(ratios):.2f}x (from {min(ratios):.2f}x to {max(ratios):.2f}x)"
    )


def comparison(ours: dict[str, Any], peer: dict[str, Any]) -> str:
    """Two runs under the same load (the aggregator and a peer, or two buffer types), side by
    side, with ratios."""
    names = f"{label(ours['config'])} / {label(peer['config'])}"
    rows = [
        ("CPU-s per million events", "seconds_per_million_events", "cpu", 1.0, "{:.2f}"),
        ("events/s per core", "per_core_events_per_s", "cpu", 1.0, "{:,.0f}"),
        ("peak RSS, MiB", "peak_rss_bytes_per_worker", "memory", 2**-20, "{:,.0f}"),
    ]
    lines = [f"side by side: {names} (same load, same sink, one run)", "-" * 78]
    for title, key, group, scale, fmt in rows:
        a, b = ours[group][key], peer[group][key]
        if isinstance(a, list):  # per worker: the largest
            a, b = max(a, default=0), max(b, default=0)
        if a is None or b is None:
            continue
        ratio = f"{a / b:.2f}x" if b else "-"
        lines.append(f"{title:<26} {fmt.format(a * scale):>12}  {fmt.format(b * scale):>12}  "
                     f"ratio {ratio}")  # fmt: skip
    return "\n".join(lines)
