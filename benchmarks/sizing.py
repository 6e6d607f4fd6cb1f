"""From measured per-core throughput to a Fargate task count, the way operators size a fleet
from published figures: the load ÷ (what one core does x the CPU target) = cores, spread over
at least two tasks of one shape, one worker per vCPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks.report import RESULTS_DIR

TARGET_UTILISATION = 0.7
"""Headroom for bursts, a lost task's share and GC pauses: size for 70 % CPU."""
MIN_TASKS = 2
"""Never one task: a deployment or a lost host must not stop the logs."""
FARGATE_SHAPES = ((1, 2048), (2, 4096), (4, 8192), (8, 16384), (16, 32768))
"""(vCPU, memory MiB): each vCPU count with the smallest memory Fargate pairs with it, which
covers ``total_limit_size`` (256 MiB by default) plus the process, per worker."""


@dataclass(frozen=True)
class PerCore:
    """What one fully busy core delivers (either figure may be unknown)."""

    mb_per_s: float | None
    events_per_s: float | None
    source: str
    """Where the figures come from, for the assumption lines."""
    peak_rss_bytes: int | None = None
    """The largest worker's peak RSS in that run, to check against the shapes' memory."""


@dataclass(frozen=True)
class TaskOption:
    vcpu: int
    memory_mib: int
    tasks: int

    @property
    def total_vcpu(self) -> int:
        return self.vcpu * self.tasks


def per_core_from_result(result: dict[str, Any], source: str) -> PerCore:
    """delivered rate ÷ (CPU seconds ÷ wall seconds): the rate one core would sustain."""
    utilisation = result["cpu"]["utilisation"]
    if not utilisation:
        raise ValueError(f"{source}: no CPU utilisation recorded")
    delivered = result["delivered"]
    peaks = result.get("memory", {}).get("peak_rss_bytes_per_worker") or []
    return PerCore(
        mb_per_s=delivered["mb_per_s"] / utilisation,
        events_per_s=delivered["events_per_s"] / utilisation,
        source=source,
        peak_rss_bytes=max(peaks, default=None),
    )


def newest_result(directory: Path = RESULTS_DIR) -> Path:
    """The newest result fit to size from: a run that passed its checks, not profiled."""
    for path in sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            result = load_result(path)
        except ValueError:  # not a result file
            continue
        if result.get("ok") and not result.get("profile"):
            return path
    raise FileNotFoundError(
        f"no passing, unprofiled result in {directory}: run `python -m benchmarks run` first, "
        "or give --results or --per-core-mb-s"
    )


def load_result(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(path.read_bytes())
    return result


def cores_needed(
    per_core: PerCore,
    mb_per_s: float | None,
    events_per_s: float | None,
    target: float = TARGET_UTILISATION,
) -> float:
    """Cores for the larger of the two demands, each at ``target`` utilisation."""
    needs = []
    for demand, capacity, what in (
        (mb_per_s, per_core.mb_per_s, "MB/s"),
        (events_per_s, per_core.events_per_s, "events/s"),
    ):
        if demand is None:
            continue
        if not capacity:
            raise ValueError(f"no per-core {what} figure to size {what} from")
        needs.append(demand / (capacity * target))
    if not needs:
        raise ValueError("give --mb-per-s, --events-per-s, or both")
    return max(needs)


def options(cores: float) -> list[TaskOption]:
    return [
        TaskOption(vcpu, memory, max(MIN_TASKS, math.ceil(cores / vcpu)))
        for vcpu, memory in FARGATE_SHAPES
    ]


def recommend(choices: list[TaskOption]) -> TaskOption:
    """The fewest vCPU in total, then the fewest tasks (larger tasks, fewer to run)."""
    return min(choices, key=lambda o: (o.total_vcpu, o.tasks))


def render(per_core: PerCore, mb_per_s: float | None, events_per_s: float | None) -> str:
    cores = cores_needed(per_core, mb_per_s, events_per_s)
    choices = options(cores)
    best = recommend(choices)
    demands = []
    if mb_per_s is not None:
        demands.append(f"{mb_per_s:,.1f} MB/s")
    if events_per_s is not None:
        demands.append(f"{events_per_s:,.0f} events/s")
    lines = [
        f"load: {' and '.join(demands)}",
        f"cores needed at {TARGET_UTILISATION:.0%} CPU: {cores:.2f}",
        "",
        f"{'vCPU':>4}  {'memory':>7}  {'tasks':>5}  {'total vCPU':>10}  {'CPU busy':>8}",
    ]
    for option in choices:
        busy = cores * TARGET_UTILISATION / option.total_vcpu
        mark = "  <- recommended" if option == best else ""
        lines.append(
            f"{option.vcpu:>4}  {option.memory_mib // 1024:>4} GB  {option.tasks:>5}  "
            f"{option.total_vcpu:>10}  {busy:>8.0%}{mark}"
        )
    lines += [
        "",
        f"recommended: {best.tasks} tasks x {best.vcpu} vCPU / {best.memory_mib // 1024} GB "
        f"(aggregator run --workers {best.vcpu})",
        "",
        "assumptions:",
        f"- one core delivers {_figure(per_core)} ({per_core.source})",
        f"- tasks are sized for {TARGET_UTILISATION:.0%} CPU; at least {MIN_TASKS} tasks",
        "- workers = vCPU, and a Fargate vCPU does what a core did in the benchmark "
        "(re-measure on the target if in doubt)",
    ]
    lines += _memory_lines(per_core, best)
    return "\n".join(lines)


def _memory_lines(per_core: PerCore, best: TaskOption) -> list[str]:
    if per_core.peak_rss_bytes is None:
        return []
    peak_mib = per_core.peak_rss_bytes / 2**20
    per_vcpu = best.memory_mib / best.vcpu
    line = f"- a worker peaked at {peak_mib:,.0f} MiB in that run; a task has {per_vcpu:,.0f} MiB"
    line += " per vCPU"
    if peak_mib <= per_vcpu:
        return [line]
    return [line, "  WARNING: more than the shape gives: lower total_limit_size or add memory"]


def _figure(per_core: PerCore) -> str:
    parts = []
    if per_core.mb_per_s is not None:
        parts.append(f"{per_core.mb_per_s:,.2f} MB/s")
    if per_core.events_per_s is not None:
        parts.append(f"{per_core.events_per_s:,.0f} events/s")
    return " or ".join(parts)
