"""Metric helpers: tallies reach their counters only when published."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from aggregator import metrics


def test_a_tally_counts_in_memory_until_published() -> None:
    counter = Counter("t_events", "test", ["source"], registry=CollectorRegistry())
    child = counter.labels("forward")
    tally = metrics.tally(child)
    assert metrics.tally(child) is tally  # one tally per counter
    tally.pending += 5
    tally.pending += 2
    assert child._value.get() == 0
    metrics.publish_tallies()
    assert child._value.get() == 7 and tally.pending == 0


def test_every_metric_is_in_the_operators_table() -> None:
    """docs/operating.md lists every metric the service exposes, by its exposed name."""
    table = (Path(__file__).parents[1] / "docs" / "operating.md").read_text()
    missing = []
    for family in metrics.REGISTRY.collect():
        exposed = family.name + ("_total" if family.type == "counter" else "")
        if f"`{exposed}`" not in table:
            missing.append(exposed)
    assert not missing, missing
