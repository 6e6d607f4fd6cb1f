"""A short run of the backlog benchmark: filled during an outage, stopped, replayed by a new
process, every event delivered, memory inside the documented bound. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import backlog


def test_a_short_backlog_is_kept_across_a_restart_and_replayed(tmp_path: Path) -> None:
    result = backlog.run(events=30_000, event_size=300, hold=0.5, json_path=tmp_path / "b.json")
    assert result.exit_status == 0, result.render()
    assert result.fill.events == result.delivered == 30_000
    assert result.fill.disk_bytes > 30_000 * 300  # the backlog was on disk, not in memory
    assert result.replay.events_per_s > 0 and result.replay.peak_rss > 0
    assert json.loads((tmp_path / "b.json").read_text())["delivered"] == 30_000
