"""Pictures of runs (PNG, with matplotlib): one per run, and a bar chart per side-by-side run.

A run's picture shows what the table cannot: events/s sent and delivered and the cores busy
over time, the largest worker's RSS over time (with the buffer limit), and the latency
percentiles. Plotting needs matplotlib (in the test extras); without it, runs go on and say
that no picture was drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIB = 2**20


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def run_png(result: dict[str, Any], path: Path, title: str) -> Path | None:
    """The picture of one run; None when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    points = result.get("timeline") or []
    t = [p["t"] for p in points]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    rate, cores, rss, latency = axes[0][0], axes[0][1], axes[1][0], axes[1][1]
    rate.plot(t, [p["sent_per_s"] for p in points], label="sent")
    rate.plot(t, [p["delivered_per_s"] for p in points], label="delivered")
    rate.set(title="events/s", xlabel="s since the load began")
    rate.legend()
    cores.plot(t, [p["cores"] for p in points], color="tab:red")
    cores.set(title="CPU: cores busy", xlabel="s since the load began", ylim=(0, None))
    rss.plot(t, [p["rss"] / MIB for p in points], color="tab:green", label="largest worker")
    limit = result["memory"].get("total_limit_bytes")
    if limit:
        rss.axhline(limit / MIB, linestyle="--", color="grey", label="total_limit_size")
    rss.set(title="RSS, MiB", xlabel="s since the load began", ylim=(0, None))
    rss.legend()
    lat = result.get("latency_ms") or {}
    names = [k for k in ("p50", "p90", "p99", "max") if lat.get(k) is not None]
    latency.bar(names, [lat[k] for k in names], color="tab:purple")
    latency.set(title=f"latency, ms ({lat.get('samples', 0):,} samples)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def comparison_png(ours: dict[str, Any], peer: dict[str, Any], path: Path) -> Path | None:
    """Bars, side by side: CPU per million events, events/s per core, peak RSS."""
    plt = _pyplot()
    if plt is None:
        return None
    names = ["aggregator", peer["config"]["subject"]]
    panels = [
        ("CPU-s per million events (lower is better)",
         [r["cpu"]["seconds_per_million_events"] or 0 for r in (ours, peer)]),
        ("events/s per core (higher is better)",
         [r["cpu"]["per_core_events_per_s"] or 0 for r in (ours, peer)]),
        ("peak RSS, MiB",
         [max(r["memory"]["peak_rss_bytes_per_worker"], default=0) / MIB for r in (ours, peer)]),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for axis, (title, values) in zip(axes, panels, strict=True):
        bars = axis.bar(names, values, color=["tab:blue", "tab:orange"])
        axis.bar_label(bars, fmt="{:,.2f}" if max(values) < 100 else "{:,.0f}")
        axis.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
