"""``aggregator top`` against a running service: one view with ``--once``, read as a script
would read it."""

from __future__ import annotations

import re
from pathlib import Path

from emulator import EmulatorThread
from tests.integration.conftest import StartAggregator, free_port
from tests.integration.test_cli import aggregator
from tests.integration.test_firehose import firehose_config
from tests.integration.test_monitoring import Load


def row(output: str, name: str) -> list[str]:
    """The cells of the table row that starts with ``name`` (columns are two spaces apart)."""
    for line in output.splitlines():
        cells = [c for c in re.split(r"\s{2,}", line.strip()) if c]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in:\n{output}")


def number(cell: str) -> float:
    value = cell.replace(",", "")
    scale = {"k": 1e3, "M": 1e6}.get(value[-1], 1.0)
    return float(value.rstrip("kM")) * scale


def test_once_shows_each_destination_with_its_event_rate(
    start_aggregator: StartAggregator, emulator: EmulatorThread
) -> None:
    agg = start_aggregator(firehose_config(emulator.endpoint_url, "events"))
    load = Load(agg.forward_port)
    load.start()
    try:
        shown = aggregator("top", "--once", "--url", agg.http, "--interval", "1")
    finally:
        load.done.set()
        load.join(30)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    out = shown.stdout
    assert "workers 2" in out
    fh = row(out, "fh")  # destination, in/s, out/s, fill bar and %, buffered, dropped, ...
    assert number(fh[1]) > 100 and number(fh[2]) > 100, out  # events/s in and delivered
    assert re.search(r"\d+%", " ".join(fh)), fh  # the buffer's fill
    assert "ok " in out  # Firehose calls by outcome
    dead = row(out, "dead")  # the file secondary: no traffic, no Firehose column
    assert number(dead[1]) == 0
    forward = row(out, "forward")  # source, events/s, bytes/s, connections, ...
    assert number(forward[1]) > 100


def test_the_control_token_from_the_flag_or_the_config(
    start_aggregator: StartAggregator, emulator: EmulatorThread, tmp_path: Path
) -> None:
    config = firehose_config(emulator.endpoint_url, "events").replace(
        "port = {http_port}\n", 'port = {http_port}\ncontrol_token = "s3cret"\n'
    )
    agg = start_aggregator(config)
    refused = aggregator("top", "--once", "--url", agg.http, "--interval", "0.2")
    assert refused.returncode == 1
    assert "401" in refused.stdout and "--token" in refused.stdout
    given = aggregator("top", "--once", "--url", agg.http, "--token", "s3cret", "--interval", "0.2")
    assert given.returncode == 0, given.stdout
    written = tmp_path / "aggregator0.toml"  # the fixture's file: found via AGGREGATOR_CONFIG
    from_config = aggregator("top", "--once", "--interval", "0.2", config=written)
    assert from_config.returncode == 0, from_config.stdout
    assert row(from_config.stdout, "fh")


def test_a_service_that_is_not_there_is_a_plain_error() -> None:
    gone = aggregator("top", "--once", "--url", f"127.0.0.1:{free_port()}")
    assert gone.returncode == 1
    assert "aggregator top: http://127.0.0.1:" in gone.stdout
    assert "Traceback" not in gone.stdout + gone.stderr
