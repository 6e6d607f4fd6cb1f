"""Latency sampling in the sink: which lines are read, and the summary."""

from __future__ import annotations

from benchmarks.latency import LatencySampler, percentile, sent_ns


def line(sent: int) -> bytes:
    return b'{"container_id":"ab","log":"%019d padding"}\n' % sent


def test_one_line_in_k_is_read_across_records_of_any_size() -> None:
    sampler = LatencySampler(every=3, clock=lambda: 10_000)
    single = [line(i) for i in range(5)]  # one event per record: events 0..4
    aggregated = [b"".join(line(i) for i in range(5, 12))]  # one record: events 5..11
    sampler("s", single)
    sampler("s", aggregated)
    sampler("s", [line(12)])
    # events 0, 3, 6, 9, 12 were read; latency = clock - sent
    assert sampler.samples == [10_000 - i for i in (0, 3, 6, 9, 12)]


def test_lines_without_a_send_time_are_counted_apart() -> None:
    sampler = LatencySampler(every=1, clock=lambda: 0)
    sampler("s", [b'{"log":"hello"}\n', b'{"n":1}\n'])
    assert sampler.samples == []
    assert sampler.summary()["unparsed"] == 2
    assert sent_ns(b'{"log":"1234567890123456789 x"}') == 1234567890123456789


def test_summary_in_milliseconds_and_reset() -> None:
    sampler = LatencySampler(every=1, clock=lambda: 1_000_000_000)
    sampler("s", [line(1_000_000_000 - ms * 1_000_000) for ms in range(1, 101)])
    summary = sampler.summary()
    assert summary["samples"] == 100
    assert (summary["p50_ms"], summary["p90_ms"], summary["p99_ms"], summary["max_ms"]) == (
        50.0,
        90.0,
        99.0,
        100.0,
    )
    sampler.reset()
    assert sampler.summary()["samples"] == 0
    assert sampler.summary()["p50_ms"] is None


def test_nearest_rank_percentile() -> None:
    assert percentile([5], 0.99) == 5
    assert percentile([1, 2, 3, 4], 0.5) == 2
    assert percentile([1, 2, 3, 4], 0.51) == 3
