"""``python -m benchmarks connections``: the burst it sends and a short real run."""

from __future__ import annotations

import orjson
import pytest

from aggregator.protocol import ForwardDecoder
from benchmarks.__main__ import main
from benchmarks.connections import make_burst, measure


def test_burst_is_whole_messages_of_the_asked_event_size() -> None:
    burst = make_burst(64 * 1024, event_size=400)
    decoder = ForwardDecoder()
    decoder.receive_data(burst.data)
    messages = []
    while (message := decoder.next_message()) is not None:
        messages.append(message)
    assert len(messages) == burst.events and burst.events > 1
    assert len(burst.data) <= 64 * 1024
    assert all(len(orjson.dumps(m.entries[0][1])) + 1 == 400 for m in messages)


def test_a_burst_is_at_least_one_event() -> None:
    assert make_burst(1).events == 1


def test_a_short_run_reads_every_event_and_reports() -> None:
    result = measure(4, make_burst(128 * 1024), timeout=30)
    assert result.connections == 4
    assert result.idle_rss > 0 and result.open_rss > 0
    assert "per connection" in result.render()


def test_event_size_too_small_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["connections", "--event-size", "10"])
    assert exit_info.value.code == 2
    assert "event size must be at least" in capsys.readouterr().err
