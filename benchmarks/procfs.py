"""What Linux's /proc says about the aggregator's processes and the machine: CPU time, memory.

CPU time is read rather than sampled so that a figure covers every cycle the processes spent,
including a worker that died and was reaped (its time moves into its parent's ``cutime``).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces and parens):
    index 0 is field 3 (state) of proc(5)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime + stime of the process, cutime + cstime of its reaped children), in seconds."""
    fields = _stat_fields(pid)
    own = int(fields[11]) + int(fields[12])
    reaped = int(fields[13]) + int(fields[14])
    return own / _CLOCK_TICKS, reaped / _CLOCK_TICKS


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (by scanning /proc: every thread's children count)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):  # it exited while we looked
            continue
    return sorted(found)


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and every descendant, live or already reaped."""
    own, reaped = cpu_seconds(root)
    total = own + reaped
    for child in children(root):
        try:
            total += tree_cpu_seconds(child)
        except OSError:  # exited between the scan and the read; its parent will count it
            continue
    return total


def status_bytes(pid: int, field: str) -> int:
    """A size field of /proc/PID/status (``VmRSS``, ``VmHWM``...) in bytes."""
    value = _kib_field(Path(f"/proc/{pid}/status"), field)
    if value is None:
        raise KeyError(f"/proc/{pid}/status has no {field}")
    return value


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare figures taken on different hosts."""
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory = _kib_field(Path("/proc/meminfo"), "MemTotal")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_bytes": memory,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _kib_field(path: Path, field: str) -> int | None:
    """A ``Name:  N kB`` line of a /proc file, in bytes."""
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None
