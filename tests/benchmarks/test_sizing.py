"""Fargate sizing arithmetic and its command."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks import sizing
from benchmarks.__main__ import main


def result(mb_per_s: float, events_per_s: float, utilisation: float) -> dict[str, Any]:
    return {
        "delivered": {"mb_per_s": mb_per_s, "events_per_s": events_per_s},
        "cpu": {"utilisation": utilisation},
    }


def test_per_core_figures_divide_by_the_cores_kept_busy() -> None:
    per_core = sizing.per_core_from_result(result(20.0, 60_000, 0.8), "r.json")
    assert per_core.mb_per_s == pytest.approx(25.0)
    assert per_core.events_per_s == pytest.approx(75_000)


def test_cores_at_seventy_percent_take_the_larger_demand() -> None:
    per_core = sizing.PerCore(mb_per_s=10.0, events_per_s=40_000, source="given")
    assert sizing.cores_needed(per_core, 35.0, None) == pytest.approx(5.0)  # 35 / (10 x 0.7)
    assert sizing.cores_needed(per_core, 35.0, 56_000) == pytest.approx(5.0)
    assert sizing.cores_needed(per_core, 7.0, 56_000) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        sizing.cores_needed(per_core, None, None)
    with pytest.raises(ValueError):
        sizing.cores_needed(sizing.PerCore(None, 1.0, "given"), 1.0, None)


def test_every_shape_gets_at_least_two_tasks_and_the_fewest_vcpu_wins() -> None:
    choices = sizing.options(5.0)
    assert [(o.vcpu, o.tasks) for o in choices] == [(1, 5), (2, 3), (4, 2), (8, 2), (16, 2)]
    best = sizing.recommend(choices)
    assert (best.vcpu, best.tasks) == (1, 5)  # 5 vCPU in all, less than 6 or 8
    tiny = sizing.options(0.1)
    assert all(o.tasks == sizing.MIN_TASKS for o in tiny)
    assert (sizing.recommend(tiny).vcpu, sizing.recommend(tiny).tasks) == (1, 2)
    # A tie on total vCPU goes to fewer, larger tasks.
    assert (
        sizing.recommend(sizing.options(8.0)).vcpu,
        sizing.recommend(sizing.options(8.0)).tasks,
    ) == (4, 2)


def test_tasks_round_up() -> None:
    cores = 100 / (3.0 * sizing.TARGET_UTILISATION)
    by_vcpu = {o.vcpu: o.tasks for o in sizing.options(cores)}
    assert by_vcpu[4] == math.ceil(cores / 4)


def test_size_command_from_a_results_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.json"
    document = {**result(10.0, 30_000, 1.0), "memory": {"peak_rss_bytes_per_worker": [3 << 30]}}
    path.write_bytes(orjson.dumps(document))
    assert main(["size", "--mb-per-s", "35", "--results", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a worker peaked at 3,072 MiB" in out and "WARNING" in out
    assert "cores needed at 70% CPU: 5.00" in out
    assert "recommended: 5 tasks x 1 vCPU" in out
    assert "10.00 MB/s" in out and str(path) in out


def test_size_command_with_a_given_figure(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["size", "--events-per-s", "140000", "--per-core-events-s", "50000"]) == 0
    assert "recommended: 2 tasks x 2 vCPU" in capsys.readouterr().out  # 4 cores


def test_size_command_without_a_load_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["size", "--per-core-mb-s", "10"])
    assert exited.value.code == 2


def test_the_newest_passing_unprofiled_result_is_used(tmp_path: Path) -> None:
    newest_first: list[tuple[str, dict[str, Any]]] = [
        ("failed", {"ok": False}),
        ("profiled", {"ok": True, "profile": "p.txt"}),
        ("good", {"ok": True, "profile": None}),
        ("older", {"ok": True}),
    ]
    for age, (name, extra) in enumerate(newest_first):
        path = tmp_path / f"{name}.json"
        path.write_bytes(orjson.dumps({**result(1.0, 1.0, 1.0), **extra}))
        os.utime(path, (1_700_000_000 - age, 1_700_000_000 - age))
    (tmp_path / "junk.json").write_text("not json")
    assert sizing.newest_result(tmp_path) == tmp_path / "good.json"
    with pytest.raises(FileNotFoundError):
        sizing.newest_result(tmp_path / "empty")
