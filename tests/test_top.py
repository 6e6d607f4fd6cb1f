"""``aggregator top``'s arithmetic: two scrapes of the exposition text → rates and a view."""

from __future__ import annotations

from rich.console import Console

from aggregator.top import View, parse, render

BEFORE = """
aggregator_buffer_events_total{destination="search"} 1000
aggregator_buffer_events_total{destination="archive"} 50
aggregator_output_events_total{destination="search"} 900
aggregator_buffer_fill_ratio{destination="search"} 0.1
aggregator_buffer_fill_ratio{destination="archive"} 0.0
aggregator_firehose_requests_total{destination="search",outcome="ok"} 10
aggregator_firehose_requests_total{destination="search",outcome="throttled"} 0
aggregator_input_events_total{source="forward"} 1050
aggregator_input_bytes_total{source="forward"} 100000
aggregator_process_cpu_seconds_total 10
aggregator_worker_restarts_total 1
"""

AFTER = """
aggregator_buffer_events_total{destination="search"} 3000
aggregator_buffer_events_total{destination="archive"} 50
aggregator_output_events_total{destination="search"} 2900
aggregator_buffer_fill_ratio{destination="search"} 0.85
aggregator_buffer_fill_ratio{destination="archive"} 0.0
aggregator_buffer_bytes{destination="search"} 2097152
aggregator_dropped_events_total{destination="search",reason="buffer_full"} 7
aggregator_dropped_events_total{destination="search",reason="record_too_large"} 1
aggregator_firehose_requests_total{destination="search",outcome="ok"} 30
aggregator_firehose_requests_total{destination="search",outcome="throttled"} 4
aggregator_firehose_failed_records_total{destination="search",error_code="InternalFailure"} 6
aggregator_input_events_total{source="forward"} 3050
aggregator_input_bytes_total{source="forward"} 300000
aggregator_open_connections{source="forward"} 312
aggregator_workers_alive 2
aggregator_process_cpu_seconds_total 13
aggregator_process_resident_memory_bytes 1.5e+08
aggregator_worker_restarts_total 1
"""


def view() -> View:
    return View.between(parse(BEFORE, at=100.0), parse(AFTER, at=102.0))


def test_counters_become_rates_over_the_time_between_scrapes() -> None:
    v = view()
    by_name = {d.name: d for d in v.destinations}
    search, archive = by_name["search"], by_name["archive"]
    assert (search.events_in, search.events_out) == (1000.0, 1000.0)
    assert search.firehose == {"ok": 10.0, "partial": 0.0, "throttled": 2.0, "error": 0.0}
    assert search.refused_records == 3.0  # 6 records, but all since the first scrape: (6-0)/2
    assert search.dropped == 8  # a total, every reason
    assert (search.fill, search.buffered_bytes) == (0.85, 2097152)
    assert archive.firehose == {}  # made no Firehose call: no outcomes to show
    assert archive.events_in == 0
    assert [(s.name, s.events, s.bytes, s.connections) for s in v.sources] == [
        ("forward", 1000.0, 100000.0, 312.0)
    ]
    assert (v.cpu, v.workers_alive, v.restarts) == (1.5, 2, 1)


def test_a_counter_that_went_back_is_not_a_negative_rate() -> None:
    v = View.between(parse(AFTER, at=0.0), parse(BEFORE, at=1.0))  # a service restarted
    assert all(d.events_in == 0 and d.events_out == 0 for d in v.destinations)


def test_the_view_names_every_destination_with_its_rate_and_fill() -> None:
    console = Console(record=True, width=200, color_system=None)
    console.print(render(view(), "http://10.0.0.7:8888/metrics", now=0.0))
    text = console.export_text()
    assert "http://10.0.0.7:8888/metrics" in text and "workers 2" in text
    search = next(line for line in text.splitlines() if line.strip().startswith("search"))
    assert "1,000" in search and "85%" in search and "2.0 MiB" in search
    assert "ok 10 · throttled 2.0 · records refused 3.0" in search
    assert "restarts 1" in text and "CPU 1.50 cores" in text and "memory 143.1 MiB" in text
