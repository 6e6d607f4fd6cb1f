"""Profiles an aggregator worker with cProfile when ``BENCH_PROFILE_DIR`` is set.

Python imports ``sitecustomize`` at start-up from the first directory of ``sys.path`` that has
one, so ``python -m benchmarks run --profile`` puts this directory on the aggregator's
PYTHONPATH: its workers profile themselves without a line of the aggregator changing. Stats
are written at a graceful exit (SIGTERM), one file per worker process.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import time
from pathlib import Path


def _is_worker() -> bool:
    # sys.argv does not name the module yet while ``-m`` is being resolved; the kernel does.
    try:
        return b"aggregator.worker" in Path("/proc/self/cmdline").read_bytes()
    except OSError:
        return False


def _start(directory: Path) -> None:
    # CPU time, not wall time: the event loop's idle waits would otherwise top the list.
    profile = cProfile.Profile(time.process_time)

    def save() -> None:
        profile.disable()
        profile.dump_stats(directory / f"worker-{os.getpid()}.pstats")

    atexit.register(save)
    profile.enable()


if (_directory := os.environ.get("BENCH_PROFILE_DIR")) and _is_worker():
    _start(Path(_directory))
