"""The service's own logs: JSON lines, and throttled recurring warnings."""

from __future__ import annotations

import json
import logging

from aggregator.logs import JsonFormatter, Throttle


def test_a_log_line_is_one_json_object_with_its_fields() -> None:
    record = logging.makeLogRecord(
        {"msg": "delivery failed", "levelname": "WARNING", "name": "x", "destination": "fh"}
    )
    line = JsonFormatter(worker=1).format(record)
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["level"] == "warning" and entry["worker"] == 1
    assert entry["message"] == "delivery failed" and entry["destination"] == "fh"
    assert entry["time"].endswith("Z")


def test_throttle_reports_once_per_interval_with_the_count() -> None:
    now = [100.0]
    throttle = Throttle(5.0, clock=lambda: now[0])
    assert throttle.hit() == 1  # the first occurrence is reported at once
    assert [throttle.hit() for _ in range(3)] == [0, 0, 0]
    now[0] += 5.0
    assert throttle.hit(2) == 5  # three held back, and these two
    assert throttle.hit() == 0
