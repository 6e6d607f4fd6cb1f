"""The real runner: sink, aggregator and load generator processes on 127.0.0.1, short runs.

No timing assertions: only that the run completes, that the counts add up, and that a sink
which loses an event makes the run fail."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks.__main__ import main
from benchmarks.config import RunConfig
from benchmarks.runner import run_benchmark

RESULT_KEYS = {
    "schema",
    "started_at",
    "config",
    "machine",
    "ok",
    "exit_status",
    "problems",
    "sent",
    "delivered",
    "lost_events",
    "duplicated_events",
    "window_s",
    "cpu",
    "memory",
    "latency_ms",
    "firehose",
    "stall",
    "harness_cpu_seconds",
    "profile",
    "aggregator_exit_status",
    "timeline",
}


def small(tmp_path: Path, **changes: Any) -> RunConfig:
    settings: dict[str, Any] = {
        "workers": 1,
        "connections": 4,
        "rate": 1000.0,
        "duration": 2.0,
        "flush_interval": "200ms",
        "drain_timeout": 15.0,
        "json_path": tmp_path / "result.json",
        **changes,
    }
    return RunConfig(**settings)


def test_a_small_run_delivers_every_event_and_writes_its_result(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_benchmark(small(tmp_path, mode="message", ack=True), out)

    assert result.exit_status == 0, out.getvalue()
    assert result.sent.events > 0
    assert result.delivered_events == result.sent.events
    assert result.sent.acks == result.sent.messages == result.sent.events
    assert result.lost == result.duplicated == 0

    document = orjson.loads((tmp_path / "result.json").read_bytes())
    assert set(document) == RESULT_KEYS
    assert document["ok"] is True
    assert document["sent"]["events"] == document["delivered"]["events"] == result.sent.events
    assert document["delivered"]["bytes"] == result.sent.events * 300
    assert document["aggregator_exit_status"] == 0
    assert document["cpu"]["seconds"] > 0
    assert document["latency_ms"]["samples"] > 0
    assert len(document["memory"]["peak_rss_bytes_per_worker"]) == 1
    assert document["config"]["mode"] == "message"
    assert {"nproc", "cpu_model", "memory_bytes", "python"} <= set(document["machine"])
    text = out.getvalue()
    assert "every event delivered" in text
    assert str(tmp_path / "result.json") in text
    # about a sample a second, the last ones after the load (draining)
    assert len(document["timeline"]) >= 2
    assert sum(p["sent_per_s"] for p in document["timeline"]) > 0
    assert max(p["rss"] for p in document["timeline"]) > 0
    assert (tmp_path / "result.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"picture: {tmp_path / 'result.png'}" in text


def test_a_lost_event_is_detected(tmp_path: Path) -> None:
    out = io.StringIO()
    config = small(tmp_path, mode="packed", batch=10, lose_records=1)
    result = run_benchmark(config, out)

    assert result.sent.events > 0
    assert result.lost == 1
    assert result.exit_status != 0
    assert f"LOST {result.lost:,} events" in out.getvalue()
    document = orjson.loads((tmp_path / "result.json").read_bytes())
    assert document["ok"] is False
    assert document["lost_events"] == result.lost


def test_bad_settings_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--stall-at", "1"])
    assert exited.value.code == 2
    assert "stall_at and stall_for go together" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["run", "--trickle-read-delay", "soon"])
    assert exited.value.code == 2
    assert "invalid duration 'soon'" in capsys.readouterr().err


def test_a_peer_takes_the_same_load_and_is_compared(tmp_path: Path) -> None:
    from benchmarks.peer import DEFAULT_PEER_BIN
    from benchmarks.report import comparison

    if not DEFAULT_PEER_BIN.exists():
        pytest.skip(f"no Fluent Bit build at {DEFAULT_PEER_BIN} on this machine")
    ours = run_benchmark(small(tmp_path), io.StringIO())
    out = io.StringIO()
    theirs = run_benchmark(
        small(tmp_path, subject="fluent-bit", json_path=tmp_path / "peer.json"), out
    )
    assert theirs.exit_status == 0, out.getvalue()
    assert theirs.delivered_events == theirs.sent.events > 0
    assert "benchmark: fluent-bit, message" in out.getvalue()
    text = comparison(ours.to_json(), theirs.to_json())
    assert "aggregator / fluent-bit" in text and "ratio" in text
    assert "CPU-s per million events" in text
    from benchmarks.plot import comparison_png

    assert comparison_png(ours.to_json(), theirs.to_json(), tmp_path / "vs.png")
    assert (tmp_path / "vs.png").read_bytes()[:4] == b"\x89PNG"


def test_pairs_take_turns_and_give_the_median_ratio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.peer import DEFAULT_PEER_BIN

    if not DEFAULT_PEER_BIN.exists():
        pytest.skip(f"no Fluent Bit build at {DEFAULT_PEER_BIN} on this machine")
    status = main(["run", "--connections", "2", "--rate", "5000", "--duration", "2",
                   "--flush-interval", "200ms", "--drain-timeout", "15", "--peer", "fluent-bit",
                   "--pairs", "2", "--json", str(tmp_path / "r.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count("side by side: aggregator / fluent-bit") == 2
    # The second pair ran the peer first: its table follows the peer's run.
    second = out[out.index("side by side") :]
    assert second.index("benchmark: fluent-bit") < second.index("benchmark: aggregator")
    assert "2 pairs, aggregator / fluent-bit CPU-s per million events: " in out
    assert "median " in out
    assert sorted(p.name for p in tmp_path.glob("r-*.json")) == ["r-1.json", "r-2.json"]


def test_pairs_without_a_peer_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--pairs", "3"])
    assert exited.value.code == 2
    assert "--pairs compares with a peer: give --peer too" in capsys.readouterr().err


def test_fleet_and_peer_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="--fleet is message mode at a set --rate"):
        RunConfig(fleet=True)
    with pytest.raises(ValueError, match="--fleet is message mode"):
        RunConfig(fleet=True, rate=1000.0, mode="packed")
    with pytest.raises(ValueError, match="subject must be one of"):
        RunConfig(subject="fluentd")
    with pytest.raises(ValueError, match="a peer runs without them"):
        RunConfig(subject="fluent-bit", aggregate=True)
    assert RunConfig(fleet=True, rate=1000.0).to_json()["fleet"] is True


def test_a_fleet_run_delivers_every_event(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_benchmark(small(tmp_path, fleet=True, connections=20, rate=2000.0), out)
    assert result.exit_status == 0, out.getvalue()
    assert result.sent.messages == result.sent.events == result.delivered_events > 0
    assert "fleet: a write per message" in out.getvalue()


def test_filters_keep_every_event_and_another_checkout_runs_beside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkout = Path(__file__).resolve().parents[2]  # this one, as "another" checkout
    status = main(["run", "--connections", "2", "--rate", "2000", "--duration", "2",
                   "--flush-interval", "200ms", "--drain-timeout", "15",
                   "--filters", "grep,record_transformer,parser,docker_partials",
                   "--against", f"source={checkout}",
                   "--json", str(tmp_path / "r.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count("every event delivered") == 2, out
    name = "filters grep+record_transformer+parser+docker_partials"
    assert f"benchmark: aggregator ({name})," in out
    assert f"benchmark: aggregator ({name}, code of {checkout.name})," in out
    document = orjson.loads((tmp_path / "r.json").read_bytes())
    # record_transformer added its fields, the parser its own: records grew
    assert document["delivered"]["bytes"] > document["sent"]["events"] * 300


def test_against_names_what_it_changes(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("filters=sed", "source=/nonexistent", "colour=blue"):
        with pytest.raises(SystemExit) as exited:
            main(["run", "--against", bad])
        assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "filters are grep, record_transformer, parser, docker_partials" in err
    assert "/nonexistent holds no aggregator package" in err
