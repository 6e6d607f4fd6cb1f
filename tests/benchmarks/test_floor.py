"""``python -m benchmarks floor``: the floor servers read every event of every mode, and the
table's medians and ratios."""

from __future__ import annotations

import pytest

from benchmarks.__main__ import main
from benchmarks.floor import Figure, measure_floor, render
from benchmarks.loadgen import LoadSpec
from benchmarks.templates import Mode


def spec(mode: Mode, ack: bool, one_per_write: bool = False) -> LoadSpec:
    return LoadSpec(host="127.0.0.1", port=0, mode=mode,
                    events_per_message=1 if mode == "message" else 20, event_size=200,
                    connections=3, senders=1, ack=ack, rate=3000, duration=1.0,
                    one_per_write=one_per_write)  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "ack", "level"),
    [("message", False, "decode"), ("forward", True, "format"), ("packed", True, "decode"),
     ("packed", False, "format")],
)  # fmt: skip
def test_a_floor_server_reads_and_acks_every_event(mode: Mode, ack: bool, level: str) -> None:
    """An event the floor misses (a mode it decodes wrongly, an ack it never sends: the sender
    then stops) is a problem: its figure would be too low to bound anything. (Its CPU figure is
    not checked: a second of this load can take less than one clock tick, 10 ms.)"""
    figure = measure_floor(level, spec(mode, ack))
    assert figure.problem is None
    assert figure.name == f"floor: {level}"


def test_the_read_floor_reads_every_byte_of_a_write_per_message() -> None:
    figure = measure_floor("read", spec("message", False, one_per_write=True))
    assert figure.problem is None


def test_the_table_gives_medians_and_ratios_to_fluent_bit() -> None:
    rounds = [
        [Figure("fluent-bit", 10.0), Figure("aggregator", 14.0), Figure("floor: read", 5.0)],
        [Figure("fluent-bit", 8.0), Figure("aggregator", 8.0), Figure("floor: read", 6.0)],
        [Figure("fluent-bit", 9.0), Figure("aggregator", 18.0), Figure("floor: read", 4.5,
                                                                      "read 1 of 2 events")],
    ]  # fmt: skip
    lines = render(rounds, "median").splitlines()
    assert lines[0] == "median"
    fluent_bit, aggregator, floor = lines[2:]
    assert fluent_bit.startswith("fluent-bit") and "9.00 CPU-s" in fluent_bit
    assert "14.00 CPU-s" in aggregator and "1.40x" in aggregator  # ratios 1.4, 1.0, 2.0
    assert "(1.40, 1.00, 2.00)" in aggregator
    assert floor.startswith("floor: read") and "0.50x" in floor and "read 1 of 2 events" in floor


def test_floor_compares_one_worker(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["floor", "--workers", "2"])
    assert exit_info.value.code == 2
    assert "--workers 1" in capsys.readouterr().err


def test_an_unknown_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["floor", "--levels", "read,parse"])
    assert exit_info.value.code == 2
    assert "levels are among read, decode, format" in capsys.readouterr().err
