"""How many CPUs this process may really use: the affinity mask and the cgroup CPU quota.

A container limited with a quota (Fargate's task vCPUs, ``docker run --cpus``) still sees every
CPU of the host in its affinity mask; a worker per host CPU there would only contend for the
quota. The quota is read from cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us`` over
``cpu.cfs_period_us``) and rounded up: half a vCPU still gets one worker.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def quota_cpus(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs, or None when there is none (or no
    cgroup file can be read: then the affinity mask alone decides)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000"
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # v1: a quota of -1 means none
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return quota_us / period_us


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """The affinity mask's CPUs, lowered to the cgroup quota rounded up; at least 1."""
    cpus = len(os.sched_getaffinity(0))
    quota = quota_cpus(root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)
