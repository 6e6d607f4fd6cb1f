"""One benchmark run: sink, aggregator and load generator started, measured, checked, stopped.

The measured window runs from the moment the senders start to the moment the sink holds every
event sent (or the aggregator says it has settled them all, or the drain timeout passes): all
the work the aggregator did for those events, and only that, falls inside it. CPU is read from
/proc at both ends, so ``cpu seconds ÷ window`` is how many cores it kept busy, and figures per
core follow by division.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TextIO

from benchmarks import plot, procfs, profiler
from benchmarks.config import RunConfig
from benchmarks.loadgen import LoadGenerator, LoadSpec, Progress
from benchmarks.peer import DEFAULT_PEER_BIN, FluentBit
from benchmarks.report import ProgressLine, default_json_path, describe, table, write_json
from benchmarks.result import RunResult
from benchmarks.service import Service, render_config
from benchmarks.sink import SinkProcess
from benchmarks.stall import StallWatch

TICK = 0.5
"""Seconds between samples while the load runs (the progress line changes every second)."""
DRAIN_POLL = 0.05
SETTLED_CHECK_EVERY = 0.5
SENDERS_STOP_TIMEOUT = 90.0
PROFILE_LINES = 30


def sink_args(config: RunConfig) -> list[str]:
    options = {
        "--port": 0,
        "--fail-rate": config.fail_rate,
        "--throttle-rate": config.throttle_rate,
        "--latency": config.sink_latency,
        "--lose-records": config.lose_records,
        "--sample-every": config.sample_every,
    }
    return [str(item) for option in options.items() for item in option]


def load_spec(config: RunConfig, port: int) -> LoadSpec:
    return LoadSpec(
        host="127.0.0.1",
        port=port,
        mode=config.mode,
        events_per_message=config.events_per_message,
        event_size=config.event_size,
        connections=config.connections,
        senders=config.sender_processes,
        ack=config.ack,
        rate=config.rate,
        duration=config.duration,
        one_per_write=config.fleet,
    )


class Subject(Protocol):
    """What a run measures: the aggregator (Service) or a peer (FluentBit)."""

    forward_port: int
    log_path: Path

    def cpu_seconds(self) -> float: ...
    def worker_memory(self, field: str) -> dict[int, int]: ...
    def has_finished(self, sent_events: int) -> bool: ...
    def stop(self, timeout: float = ...) -> int: ...
    def kill(self) -> None: ...


def start_subject(
    config: RunConfig, sink_url: str, workdir: Path, extra_env: dict[str, str] | None
) -> Subject:
    if config.subject == "fluent-bit":
        binary = config.peer_bin or DEFAULT_PEER_BIN
        return FluentBit.start(binary, sink_url, config.flush_interval_s, config.workers, workdir)
    config_text = render_config(config, sink_url, workdir)
    if config.source is not None:  # another checkout's package, first on the path
        extra_env = {**(extra_env or {}), "PYTHONPATH": str(config.source)}
    return Service.start(config_text, config.workers, workdir, extra_env=extra_env,
                         cwd=config.source)  # fmt: skip


@dataclass
class _Harness:
    """The three parts of a run, started."""

    config: RunConfig
    sink: SinkProcess
    service: Subject
    load: LoadGenerator
    progress: ProgressLine
    started: float = 0.0
    """When the load began (time.monotonic())."""
    idle_rss: int = 0
    """The largest worker's RSS before the load."""
    timeline: list[dict[str, float]] = field(default_factory=list)
    _last: tuple[float, int, int, float] | None = None

    def sample(self, now: float, sent: int, delivered: int) -> str:
        """Add a point to the timeline; the progress line's figures."""
        started = self.started
        cpu = self.service.cpu_seconds()
        rss = max(self.service.worker_memory("VmRSS").values(), default=0)
        last = self._last or (started, 0, 0, cpu)
        span = max(now - last[0], 1e-9)
        point = {
            "t": round(now - started, 2),
            "sent_per_s": (sent - last[1]) / span,
            "delivered_per_s": (delivered - last[2]) / span,
            "cores": (cpu - last[3]) / span,
            "rss": float(rss),
        }
        self.timeline.append(point)
        self._last = (now, sent, delivered, cpu)
        return (f"sent {point['sent_per_s']:>10,.0f} ev/s  "
                f"delivered {point['delivered_per_s']:>10,.0f} ev/s  "
                f"backlog {max(0, sent - delivered):>10,}  worker RSS {rss / 2**20:5,.0f} MiB")


def run_benchmark(config: RunConfig, out: TextIO | None = None) -> RunResult:
    """Run once, print the progress and the table on ``out``, write the JSON file."""
    out = sys.stdout if out is None else out
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    json_path = config.json_path or default_json_path(config.mode, subject=config.subject)
    with tempfile.TemporaryDirectory(prefix="aggregator-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        profile_dir = workdir / "profile"
        profile_dir.mkdir()
        extra_env = profiler.profiler_env(profile_dir) if config.profile else None
        sink = SinkProcess(sink_args(config), workdir / "sink.log")
        stack.callback(sink.stop)
        service = start_subject(config, sink.url, workdir, extra_env)
        stack.callback(service.kill)
        load = LoadGenerator(load_spec(config, service.forward_port))
        stack.callback(load.close)
        load.connect()
        result = _measure(_Harness(config, sink, service, load, ProgressLine(out)), started_at)
        if not result.ok:  # the temporary directory goes: keep what explains the failure
            log_copy = json_path.with_suffix(f".{config.subject}.log")
            log_copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(service.log_path, log_copy)
            result.problems.append(f"the aggregator's log is in {log_copy}")
        profile_text = profiler.report(profile_dir) if config.profile else None
    result.json_path = json_path
    if profile_text is not None:
        result.profile_path = json_path.with_suffix(".profile.txt")
        result.profile_path.parent.mkdir(parents=True, exist_ok=True)
        result.profile_path.write_text(profile_text)
    document = result.to_json()
    write_json(document, json_path)
    out.write(table(document) + "\n")
    picture = plot.run_png(document, json_path.with_suffix(".png"), describe(document["config"]))
    out.write(f"picture: {picture}\n" if picture else "no picture: matplotlib is not installed\n")
    if profile_text is not None:
        top = "\n".join(profile_text.splitlines()[:PROFILE_LINES])
        out.write(f"{top}\n...\nprofile (slowed down by cProfile): {result.profile_path}\n")
    out.write(f"results: {json_path}\n")
    out.flush()
    return result


def _measure(harness: _Harness, started_at: str) -> RunResult:
    config, sink, service, load = harness.config, harness.sink, harness.service, harness.load
    baseline_rss = list(service.worker_memory("VmRSS").values())
    harness.idle_rss = max(baseline_rss, default=0)
    sink_cpu_before = sum(procfs.cpu_seconds(sink.pid))
    cpu_before = service.cpu_seconds()
    started = time.monotonic()
    load.start()
    harness.started = started
    harness.sample(started, 0, 0)
    stall = _watch_load(harness, started)
    sent = load.wait(SENDERS_STOP_TIMEOUT)
    problems: list[str] = []
    if not load.finished:
        problems.append("the load generator did not stop in time: sent counts may be short")
    delivered_at = _drain(harness, sent, problems)
    harness.progress.end()
    cpu_seconds = service.cpu_seconds() - cpu_before
    sink_cpu_seconds = sum(procfs.cpu_seconds(sink.pid)) - sink_cpu_before
    peak_rss = list(service.worker_memory("VmHWM").values())
    exit_status: int | None
    try:
        exit_status = service.stop()
    except subprocess.TimeoutExpired:
        exit_status = None
        problems.append(f"{config.subject} did not stop in time after SIGTERM (killed)")
    final = sink.bench_stats()
    return RunResult(
        config=config,
        started_at=started_at,
        machine=procfs.machine(),
        sent=sent,
        delivered=final["emulator"],
        latency=final["latency"],
        window_s=delivered_at - started,
        cpu_seconds=cpu_seconds,
        baseline_rss=baseline_rss,
        peak_rss=peak_rss,
        stall=None if stall is None else stall.report(),
        aggregator_exit_status=exit_status,
        sink_cpu_seconds=sink_cpu_seconds,
        problems=problems,
        timeline=harness.timeline,
    )


def _watch_load(harness: _Harness, started: float) -> StallWatch | None:
    """Sample while the senders run: the progress line every second, the stall if asked."""
    config, sink, service, load = harness.config, harness.sink, harness.service, harness.load
    watch: StallWatch | None = None
    stalled = False
    last_shown = started
    tick = 0
    while not load.finished:
        tick += 1
        time.sleep(max(0.0, started + tick * TICK - time.monotonic()))
        now = time.monotonic()
        elapsed = now - started
        sent = load.poll().events
        if config.stall is not None:
            stall_at, stall_for = config.stall
            if watch is None and elapsed >= stall_at:
                sink.configure(stalled=True)
                stalled = True
                watch = StallWatch(stall_at, stall_for, config.total_limit_bytes, harness.idle_rss)
            if watch is not None and stalled:
                watch.sample(elapsed - stall_at, sent, service.worker_memory("VmRSS"))
                if elapsed >= stall_at + stall_for:
                    sink.configure(stalled=False)
                    stalled = False
        if now - last_shown >= 1.0 - TICK / 2:
            delivered = int(sink.stats()["accepted_events"])
            figures = harness.sample(now, sent, delivered)
            harness.progress.show(
                f"{elapsed:6.1f} s  {figures}" + ("  [sink stalled]" if stalled else "")
            )
            last_shown = now
    if stalled:  # the senders ended first (only if they failed: the config forbids it)
        sink.configure(stalled=False)
    return watch


def _drain(harness: _Harness, sent: Progress, problems: list[str]) -> float:
    """Wait until the sink holds every sent event, or the aggregator has settled them all, or
    the drain timeout passes; returns when that was."""
    timeout = harness.config.drain_timeout_s
    began = time.monotonic()
    next_check = next_show = began
    while True:
        now = time.monotonic()
        delivered = int(harness.sink.stats()["accepted_events"])
        if delivered >= sent.events:
            return now
        if now >= next_check:
            next_check = now + SETTLED_CHECK_EVERY
            if harness.service.has_finished(sent.events):
                return now
        if now >= began + timeout:
            missing = sent.events - delivered
            problems.append(
                f"the sink still lacked {missing:,} events {timeout:g} s after the load"
            )
            return now
        if now >= next_show:
            next_show = now + 1.0
            harness.sample(now, sent.events, delivered)
            backlog = max(0, sent.events - delivered)
            harness.progress.show(f"draining {now - began:4.1f} s: backlog {backlog:,} events")
        time.sleep(DRAIN_POLL)
