"""The service's own logs: one JSON object per line on stderr.

On Fargate stderr goes to CloudWatch through awslogs, where one object per line is searchable.
These logs are never routed into the service itself.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

# Attributes every LogRecord has; anything else came from ``extra=`` and is a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | str | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        entry["message"] = record.getMessage()
        entry["logger"] = record.name
        for key, value in vars(record).items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup(level: str = "info", worker: int | str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiobotocore/botocore are chatty at info; their errors reach us as exceptions anyway.
    for noisy in ("botocore", "aiobotocore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Throttle:
    """At most one log line per ``interval`` seconds for a recurring condition, with the count
    of occurrences it stands for: a failing destination or a stream of unmatched tags must not
    flood the logs (and CloudWatch's bill) with one line per chunk or per message."""

    __slots__ = ("_clock", "_interval", "_last", "_pending")

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last = -interval
        self._pending = 0

    def hit(self, count: int = 1) -> int:
        """Record ``count`` occurrences; the number to report if a line is due now, else 0."""
        self._pending += count
        now = self._clock()
        if now - self._last < self._interval:
            return 0
        self._last = now
        due, self._pending = self._pending, 0
        return due
