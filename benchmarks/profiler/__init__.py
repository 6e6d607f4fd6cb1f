"""``run --profile``: cProfile inside the aggregator's workers, merged into one text report.

The workers are started by the aggregator's supervisor, not by us, so the profiler rides in
on ``sitecustomize`` (see ``sitecustomize.py`` here). cProfile slows Python code down, so a
profiled run's figures show where the time goes, not how fast the aggregator is.
"""

from __future__ import annotations

import io
import os
import pstats
from pathlib import Path

HERE = Path(__file__).resolve().parent


def profiler_env(directory: Path) -> dict[str, str]:
    """Environment for the aggregator so that each worker writes its stats to ``directory``."""
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "BENCH_PROFILE_DIR": str(directory)}


def report(directory: Path, limit: int = 40) -> str | None:
    """Every worker's stats merged: the functions by own time, then by cumulative time."""
    files = sorted(directory.glob("worker-*.pstats"))
    if not files:
        return None
    text = io.StringIO()
    stats = pstats.Stats(*map(str, files), stream=text)
    stats.strip_dirs()
    text.write(f"cProfile of {len(files)} aggregator worker process(es)\n")
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    return text.getvalue()
