"""What a worker knows of the process model: its supervisor, and the state it publishes.

The supervisor passes its pid and the path of a small state file in the environment; without
them (a worker run on its own, as in tests of one process) the worker is the whole service.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from typing import TypedDict

EXIT_OK = 0
EXIT_UNDELIVERED = 1
"""Events had to go to a secondary destination or were dropped during the stop (or the ports
could not be opened)."""
EXIT_CONFIG = 2
"""The configuration cannot work: invalid, or a destination that cannot start."""
EXIT_FORCED = 3
"""A second stop signal: buffered events were abandoned."""

HEARTBEAT_INTERVAL = 1.0
"""Seconds between two beats a worker sends its supervisor."""

SUPERVISOR_PID_ENV = "AGGREGATOR_SUPERVISOR_PID"
STATE_FILE_ENV = "AGGREGATOR_STATE_FILE"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_OWN_METRICS_DIR_ENV = "AGGREGATOR_OWN_METRICS_DIR"


class ServiceState(TypedDict):
    expected: int  # workers configured
    alive: int  # workers running now


def supervisor_pid() -> int | None:
    value = os.environ.get(SUPERVISOR_PID_ENV)
    return int(value) if value else None


def read_state() -> ServiceState | None:
    """What the supervisor last wrote about the workers, if supervised."""
    path = os.environ.get(STATE_FILE_ENV)
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            state: ServiceState = json.load(f)
            return state
    except (OSError, ValueError):
        return None


def write_state(path: str, state: ServiceState) -> None:
    """Atomically, so a worker never reads half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def flush_everywhere(flush_here: Callable[[], None]) -> None:
    """Flush this worker now, and ask the supervisor to have every worker flush (SIGUSR1)."""
    flush_here()
    pid = supervisor_pid()
    if pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGUSR1)


def prepare_metrics_dir() -> str:
    """Turn on prometheus-client's multiprocess mode for this process and its workers. Must run
    before prometheus-client is first imported (it reads the setting at import). A directory the
    user chose is emptied of old files, as prometheus-client's docs ask; else a fresh one."""
    path = os.environ.get(METRICS_DIR_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.remove(os.path.join(path, name))
        return path
    path = tempfile.mkdtemp(prefix="aggregator-metrics-")
    os.environ[METRICS_DIR_ENV] = path
    os.environ[_OWN_METRICS_DIR_ENV] = path
    return path


def remove_metrics_dir() -> None:
    """Remove the directory :func:`prepare_metrics_dir` made (not one the user chose)."""
    path = os.environ.get(_OWN_METRICS_DIR_ENV)
    if path:
        shutil.rmtree(path, ignore_errors=True)
