"""The workers' default: the cgroup CPU quota lowers the affinity mask's count."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from aggregator.config.cpus import available_cpus, quota_cpus


def _v2(root: Path, text: str) -> Path:
    (root / "cpu.max").write_text(text)
    return root


def _v1(root: Path, quota: int, period: int) -> Path:
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda r: _v2(r, "max 100000\n"), None),
        (lambda r: _v2(r, "150000 100000\n"), 1.5),  # docker run --cpus 1.5
        (lambda r: _v1(r, -1, 100000), None),
        (lambda r: _v1(r, 25000, 100000), 0.25),  # a quarter-vCPU Fargate task
        (lambda r: r, None),  # no cgroup files at all
        (lambda r: _v2(r, "garbage\n"), None),
    ],
)
def test_the_quota_is_read_from_cgroup_v2_or_v1(
    tmp_path: Path, make: Callable[[Path], Path], expected: float | None
) -> None:
    assert quota_cpus(make(tmp_path)) == expected


def test_workers_follow_the_quota_rounded_up_and_never_exceed_the_affinity(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(_v2(tmp_path, "25000 100000")) == 1
    (tmp_path / "cpu.max").write_text(f"{affinity * 100000 + 1} 100000")
    assert available_cpus(tmp_path) == affinity  # a quota above the mask does not add CPUs
    (tmp_path / "cpu.max").write_text("max 100000")
    assert available_cpus(tmp_path) == affinity
