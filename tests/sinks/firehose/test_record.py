from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from aggregator.config.model import FIREHOSE_MAX_RECORD_BYTES
from aggregator.sinks.firehose.record import Record, RecordSet, build_records


def line(i: int, size: int) -> bytes:
    """A unique line of exactly ``size`` bytes (size >= 8), newline included."""
    head = b"%06d" % i
    return head + b"x" * (size - len(head) - 1) + b"\n"


def test_one_line_per_record_when_not_aggregating() -> None:
    lines = [line(i, 20) for i in range(5)]
    out = build_records(lines, aggregate=False, record_max_size=FIREHOSE_MAX_RECORD_BYTES)
    assert out.oversize == []
    assert [r.data for r in out.records] == lines
    assert all(list(r.lines) == [r.data] for r in out.records)


def test_empty_chunk_builds_nothing() -> None:
    for aggregate in (False, True):
        assert build_records([], aggregate=aggregate, record_max_size=100) == RecordSet()


def test_oversize_line_is_set_aside_when_not_aggregating() -> None:
    small, big = line(0, 100), line(1, 101)
    out = build_records([small, big, small], aggregate=False, record_max_size=100)
    assert [r.data for r in out.records] == [small, small]
    assert out.oversize == [big]


def test_aggregation_fills_records_up_to_exactly_the_limit() -> None:
    lines = [line(i, 25) for i in range(10)]
    out = build_records(lines, aggregate=True, record_max_size=100)
    assert [len(r.data) for r in out.records] == [100, 100, 50]
    assert [list(r.lines) for r in out.records] == [lines[0:4], lines[4:8], lines[8:10]]
    assert all(r.data == b"".join(r.lines) for r in out.records)


def test_aggregation_starts_a_new_record_one_byte_over() -> None:
    a, b = line(0, 50), line(1, 51)
    out = build_records([a, b], aggregate=True, record_max_size=100)
    assert out.records == [Record(a, [a]), Record(b, [b])]


def test_a_line_of_exactly_the_limit_is_a_record_of_its_own() -> None:
    small, exact = line(0, 10), line(1, 100)
    out = build_records([small, exact, small], aggregate=True, record_max_size=100)
    assert [list(r.lines) for r in out.records] == [[small], [exact], [small]]
    assert out.oversize == []


def test_oversize_line_splits_the_run_and_is_never_packed() -> None:
    a, b, big, c = line(0, 10), line(1, 10), line(2, 500), line(3, 10)
    out = build_records([big, a, b, big, c, big], aggregate=True, record_max_size=100)
    assert [r.data for r in out.records] == [a + b, c]
    assert out.oversize == [big, big, big]


def test_aggregated_records_are_newline_delimited() -> None:
    lines = [b'{"a":1}\n', b'{"b":2}\n', b'{"c":3}\n']
    out = build_records(lines, aggregate=True, record_max_size=FIREHOSE_MAX_RECORD_BYTES)
    assert len(out.records) == 1
    assert out.records[0].data.splitlines(keepends=True) == lines


sizes = st.lists(st.integers(min_value=8, max_value=300), max_size=200)


@given(sizes=sizes, limit=st.integers(min_value=8, max_value=400), aggregate=st.booleans())
def test_every_line_ends_up_exactly_once_in_order(
    sizes: list[int], limit: int, aggregate: bool
) -> None:
    lines = [line(i, n) for i, n in enumerate(sizes)]
    out = build_records(lines, aggregate=aggregate, record_max_size=limit)

    carried = [x for r in out.records for x in r.lines]
    assert carried == [x for x in lines if len(x) <= limit]
    assert out.oversize == [x for x in lines if len(x) > limit]
    for r in out.records:
        assert r.data == b"".join(r.lines)
        assert 0 < len(r.data) <= limit
        assert len(r.lines) == 1 or aggregate


@given(sizes=sizes, limit=st.integers(min_value=8, max_value=400))
def test_aggregation_is_greedy(sizes: list[int], limit: int) -> None:
    # A record is closed only when the next line would not fit or is oversize: no cost is left
    # on the table by closing early.
    lines = [line(i, n) for i, n in enumerate(sizes)]
    position = {x: i for i, x in enumerate(lines)}
    out = build_records(lines, aggregate=True, record_max_size=limit)
    for record in out.records:
        following = position[record.lines[-1]] + 1
        if following < len(lines):
            assert len(record.data) + len(lines[following]) > limit
