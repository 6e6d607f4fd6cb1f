"""``aggregator top``: a live view of a running service from its ``/metrics``, as ``vector top``.

Two scrapes make a view: counters become rates over the time between them. Per destination:
events/s into its buffer and delivered, the buffer's fill (of its fullest worker), what it holds,
events dropped, Firehose calls by outcome and records refused; per source: events/s, bytes/s,
open connections, bad input; and the workers. It reads nothing but ``/metrics``, so it works
against any task it can reach (with the control token when one is set).
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

Labels = tuple[tuple[str, str], ...]
FIREHOSE_OUTCOMES = ("ok", "partial", "throttled", "error")


class ScrapeError(Exception):
    """The service could not be asked, or did not answer with its metrics."""


@dataclass(frozen=True)
class Scrape:
    at: float
    samples: dict[str, dict[Labels, float]]
    """Sample name (with ``_total``) → labels → value, summed over identical label sets."""

    def by(self, name: str, label: str, **where: str) -> dict[str, float]:
        """One metric's values summed by one label, of the samples whose labels include
        ``where``."""
        out: dict[str, float] = defaultdict(float)
        for labels, value in self.samples.get(name, {}).items():
            named = dict(labels)
            if where.items() <= named.items():
                out[named.get(label, "")] += value
        return out

    def total(self, name: str) -> float:
        return sum(self.samples.get(name, {}).values())


def parse(text: str, at: float) -> Scrape:
    samples: dict[str, dict[Labels, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            found = samples[sample.name]
            found[key] = found.get(key, 0.0) + sample.value
    return Scrape(at, dict(samples))


def scrape(url: str, token: str | None, timeout: float = 5.0) -> Scrape:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            text = resp.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise ScrapeError(f"{url}: 401: the service has a control_token: pass --token, "
                              "or -c with its config") from exc  # fmt: skip
        raise ScrapeError(f"{url}: {exc.code} {exc.reason}") from exc
    except (OSError, ValueError) as exc:
        raise ScrapeError(f"{url}: {exc}") from exc
    try:
        return parse(text, time.monotonic())
    except ValueError as exc:
        raise ScrapeError(f"{url}: not Prometheus metrics: {exc}") from exc


@dataclass
class DestinationRow:
    name: str
    events_in: float
    events_out: float
    fill: float
    buffered_bytes: float
    dropped: float
    retries: float
    firehose: dict[str, float] = field(default_factory=dict)
    refused_records: float = 0.0
    last_success: float = 0.0


@dataclass
class SourceRow:
    name: str
    events: float
    bytes: float
    connections: float
    bad_input: float
    limited: float


@dataclass
class View:
    """What two scrapes say, rates per second over the time between them."""

    destinations: list[DestinationRow]
    sources: list[SourceRow]
    workers_alive: float
    restarts: float
    watchdog_kills: float
    cpu: float
    """CPU seconds per second of every process (1.0 = one core)."""
    memory: float
    unmatched: float

    @classmethod
    def between(cls, before: Scrape, now: Scrape) -> View:
        seconds = max(now.at - before.at, 1e-9)

        def rate(name: str, label: str, **where: str) -> Callable[[str], float]:
            old, new = before.by(name, label, **where), now.by(name, label, **where)
            return lambda key: max(0.0, new.get(key, 0.0) - old.get(key, 0.0)) / seconds

        def total_rate(name: str) -> float:
            return max(0.0, now.total(name) - before.total(name)) / seconds

        buffered_in = rate("aggregator_buffer_events_total", "destination")
        delivered = rate("aggregator_output_events_total", "destination")
        retries = rate("aggregator_retries_total", "destination")
        refused = rate("aggregator_firehose_failed_records_total", "destination")
        fill = now.by("aggregator_buffer_fill_ratio", "destination")
        held = now.by("aggregator_buffer_bytes", "destination")
        dropped = now.by("aggregator_dropped_events_total", "destination")
        last = now.by("aggregator_last_success_timestamp_seconds", "destination")
        calls = {o: rate("aggregator_firehose_requests_total", "destination", outcome=o)
                 for o in FIREHOSE_OUTCOMES}  # fmt: skip
        # Only destinations that made a Firehose call have Firehose outcomes.
        firehose = set(now.by("aggregator_firehose_requests_total", "destination"))
        names = sorted(set(fill) | set(now.by("aggregator_buffer_events_total", "destination")))
        destinations = []
        for name in names:
            outcomes = {o: calls[o](name) for o in FIREHOSE_OUTCOMES} if name in firehose else {}
            destinations.append(DestinationRow(
                name, buffered_in(name), delivered(name), fill.get(name, 0.0),
                held.get(name, 0.0), dropped.get(name, 0.0), retries(name), outcomes,
                refused(name), last.get(name, 0.0),
            ))  # fmt: skip
        events = rate("aggregator_input_events_total", "source")
        received = rate("aggregator_input_bytes_total", "source")
        connections = now.by("aggregator_open_connections", "source")
        bad = now.by("aggregator_input_errors_total", "source")
        limited = now.by("aggregator_limited_events_total", "source")
        source_names = sorted(set(now.by("aggregator_input_events_total", "source"))
                              | set(connections))  # fmt: skip
        sources = []
        for name in source_names:
            sources.append(SourceRow(name, events(name), received(name),
                                     connections.get(name, 0.0), bad.get(name, 0.0),
                                     limited.get(name, 0.0)))  # fmt: skip
        return cls(
            destinations, sources,
            workers_alive=now.total("aggregator_workers_alive"),
            restarts=now.total("aggregator_worker_restarts_total"),
            watchdog_kills=now.total("aggregator_worker_watchdog_kills_total"),
            cpu=total_rate("aggregator_process_cpu_seconds_total"),
            memory=now.total("aggregator_process_resident_memory_bytes"),
            unmatched=total_rate("aggregator_unmatched_events_total"),
        )  # fmt: skip


# --- rendering -------------------------------------------------------------------------------


def _count(value: float) -> str:
    if value >= 10_000_000:
        return f"{value / 1e6:,.1f}M"
    if value >= 100_000:
        return f"{value / 1e3:,.0f}k"
    return f"{value:,.0f}" if value >= 10 or value == 0 else f"{value:,.1f}"


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _ago(timestamp: float, now: float) -> str:
    if timestamp <= 0:
        return "never"
    seconds = max(0.0, now - timestamp)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _fill(ratio: float, width: int = 12) -> Text:
    style = "red" if ratio >= 0.9 else "yellow" if ratio >= 0.8 else "green"
    done = round(min(max(ratio, 0.0), 1.0) * width)
    return Text.assemble(("█" * done, style), ("░" * (width - done), "dim"),
                         (f" {ratio:>4.0%}", style))  # fmt: skip


def _firehose(calls: dict[str, float], refused: float) -> str:
    if not calls:
        return "-"
    parts = [f"{outcome} {_count(calls.get(outcome, 0.0))}" for outcome in FIREHOSE_OUTCOMES
             if calls.get(outcome) or outcome == "ok"]  # fmt: skip
    if refused:
        parts.append(f"records refused {_count(refused)}")
    return " · ".join(parts)


def render(view: View, url: str, now: float | None = None) -> RenderableType:
    wall = time.time() if now is None else now
    header = Text.assemble(
        ("aggregator top ", "bold"), (url, "cyan"),
        f"   workers {view.workers_alive:.0f}",
        f" · restarts {view.restarts:.0f}",
        (f" · watchdog kills {view.watchdog_kills:.0f}", "red" if view.watchdog_kills else ""),
        f" · CPU {view.cpu:.2f} cores · memory {_bytes(view.memory)}",
        (f" · unmatched {_count(view.unmatched)}/s", "yellow" if view.unmatched else ""),
    )  # fmt: skip
    destinations = Table(title="destinations", title_justify="left", box=box.SIMPLE_HEAD,
                         expand=False)  # fmt: skip
    for column, justify in (("destination", "left"), ("in/s", "right"), ("out/s", "right"),
                            ("buffer fill", "left"), ("buffered", "right"),
                            ("dropped", "right"), ("retries/s", "right"),
                            ("firehose calls/s", "left"), ("last success", "right")):  # fmt: skip
        destinations.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for d in view.destinations:
        destinations.add_row(
            d.name, _count(d.events_in), _count(d.events_out), _fill(d.fill),
            _bytes(d.buffered_bytes),
            Text(f"{d.dropped:,.0f}", style="red" if d.dropped else ""),
            _count(d.retries), _firehose(d.firehose, d.refused_records),
            _ago(d.last_success, wall),
        )  # fmt: skip
    sources = Table(title="sources", title_justify="left", box=box.SIMPLE_HEAD)
    for column, justify in (("source", "left"), ("events/s", "right"), ("bytes/s", "right"),
                            ("connections", "right"), ("bad input", "right"),
                            ("limited", "right")):  # fmt: skip
        sources.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for s in view.sources:
        sources.add_row(s.name, _count(s.events), _bytes(s.bytes), f"{s.connections:,.0f}",
                        f"{s.bad_input:,.0f}", f"{s.limited:,.0f}")  # fmt: skip
    return Group(header, destinations, sources)


def run(url: str, token: str | None, interval: float, once: bool,
        console: Console | None = None) -> int:  # fmt: skip
    """Show the view every ``interval`` seconds until Ctrl-C; with ``once``, one view (two
    scrapes ``interval`` apart) on standard output, then exit. Exit 1 when the service cannot
    be read."""
    console = console or Console(width=None if _is_terminal() else 160)
    try:
        before = scrape(url, token)
        if once:
            time.sleep(interval)
            console.print(render(View.between(before, scrape(url, token)), url))
            return 0
    except ScrapeError as exc:
        console.print(f"aggregator top: {exc}", style="red", markup=False, highlight=False)
        return 1
    from rich.live import Live

    try:
        with Live(Text("waiting for the second scrape..."), console=console,
                  refresh_per_second=4, screen=False) as live:  # fmt: skip
            for now in _ticks(url, token, interval):
                if isinstance(now, ScrapeError):
                    live.update(Text(f"aggregator top: {now} (trying again)", style="red"))
                    continue
                live.update(render(View.between(before, now), url))
                before = now
    except KeyboardInterrupt:
        pass
    return 0


def _ticks(url: str, token: str | None, interval: float) -> Iterable[Scrape | ScrapeError]:
    while True:
        time.sleep(interval)
        try:
            yield scrape(url, token)
        except ScrapeError as exc:
            yield exc


def _is_terminal() -> bool:
    return sys.stdout.isatty()
