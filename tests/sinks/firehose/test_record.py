from __future__ import annotations

import gzip
import zlib

from hypothesis import given
from hypothesis import strategies as st

from aggregator.config.model import FIREHOSE_MAX_RECORD_BYTES
from aggregator.sinks.firehose.record import Records, build_records, shaper


def line(i: int, size: int) -> bytes:
    """A unique line of exactly ``size`` bytes (size >= 8), newline included."""
    head = b"%06d" % i
    return head + b"x" * (size - len(head) - 1) + b"\n"


def test_one_line_per_record_when_not_aggregating() -> None:
    lines = [line(i, 20) for i in range(5)]
    out = build_records(lines, aggregate=False, record_max_size=FIREHOSE_MAX_RECORD_BYTES)
    assert out.oversize == []
    assert out.records.data == lines
    assert [list(out.records.lines_of(i)) for i in range(5)] == [[x] for x in lines]


def test_empty_chunk_builds_nothing() -> None:
    for aggregate in (False, True):
        out = build_records([], aggregate=aggregate, record_max_size=100)
        assert len(out.records) == 0 and out.records.lines() == [] and out.oversize == []


def test_oversize_line_is_set_aside_when_not_aggregating() -> None:
    small, big = line(0, 100), line(1, 101)
    out = build_records([small, big, small], aggregate=False, record_max_size=100)
    assert out.records.data == [small, small]
    assert out.records.lines() == [small, small]
    assert out.oversize == [big]


def test_aggregation_fills_records_up_to_exactly_the_limit() -> None:
    lines = [line(i, 25) for i in range(10)]
    out = build_records(lines, aggregate=True, record_max_size=100)
    assert list(map(len, out.records.data)) == [100, 100, 50]
    assert [list(out.records.lines_of(i)) for i in range(3)] == [lines[0:4], lines[4:8], lines[8:]]
    assert out.records.data == [b"".join(out.records.lines_of(i)) for i in range(3)]
    assert out.records.lines() == lines


def test_aggregation_starts_a_new_record_one_byte_over() -> None:
    a, b = line(0, 50), line(1, 51)
    out = build_records([a, b], aggregate=True, record_max_size=100)
    assert out.records == Records([a, b], [[a], [b]])


def test_a_line_of_exactly_the_limit_is_a_record_of_its_own() -> None:
    small, exact = line(0, 10), line(1, 100)
    out = build_records([small, exact, small], aggregate=True, record_max_size=100)
    assert [list(out.records.lines_of(i)) for i in range(3)] == [[small], [exact], [small]]
    assert out.oversize == []


def test_oversize_line_splits_the_run_and_is_never_packed() -> None:
    a, b, big, c = line(0, 10), line(1, 10), line(2, 500), line(3, 10)
    out = build_records([big, a, b, big, c, big], aggregate=True, record_max_size=100)
    assert out.records.data == [a + b, c]
    assert out.oversize == [big, big, big]


def test_aggregated_records_are_newline_delimited() -> None:
    lines = [b'{"a":1}\n', b'{"b":2}\n', b'{"c":3}\n']
    out = build_records(lines, aggregate=True, record_max_size=FIREHOSE_MAX_RECORD_BYTES)
    assert len(out.records) == 1
    assert out.records.data[0].splitlines(keepends=True) == lines


sizes = st.lists(st.integers(min_value=8, max_value=300), max_size=200)


@given(sizes=sizes, limit=st.integers(min_value=8, max_value=400), aggregate=st.booleans())
def test_every_line_ends_up_exactly_once_in_order(
    sizes: list[int], limit: int, aggregate: bool
) -> None:
    lines = [line(i, n) for i, n in enumerate(sizes)]
    out = build_records(lines, aggregate=aggregate, record_max_size=limit)

    records = out.records
    carried = [x for i in range(len(records)) for x in records.lines_of(i)]
    assert carried == records.lines() == [x for x in lines if len(x) <= limit]
    assert out.oversize == [x for x in lines if len(x) > limit]
    for i, data in enumerate(records.data):
        assert data == b"".join(records.lines_of(i))
        assert 0 < len(data) <= limit
        assert len(records.lines_of(i)) == 1 or aggregate
    # A part is the same records, with the same lines.
    part = records.part(1, 3)
    assert part.data == records.data[1:3]
    assert part.lines() == [x for i in range(1, min(3, len(records))) for x in records.lines_of(i)]


@given(sizes=sizes, limit=st.integers(min_value=8, max_value=400))
def test_aggregation_is_greedy(sizes: list[int], limit: int) -> None:
    # A record is closed only when the next line would not fit or is oversize: no cost is left
    # on the table by closing early.
    lines = [line(i, n) for i, n in enumerate(sizes)]
    position = {x: i for i, x in enumerate(lines)}
    out = build_records(lines, aggregate=True, record_max_size=limit)
    for i, data in enumerate(out.records.data):
        following = position[out.records.lines_of(i)[-1]] + 1
        if following < len(lines):
            assert len(data) + len(lines[following]) > limit


def test_shaped_records_are_what_the_kinesis_plugin_sends() -> None:
    lines = [b'{"log":"GET / 200\\n","n":1}\n', b'{"n":2}\n', b'{"log":{"a":1},"n":3}\n',
             b'{"log":"plain","n":4}\n']  # fmt: skip
    out = build_records(lines, aggregate=False, record_max_size=100,
                        shape=shaper("log", None, False))  # fmt: skip
    # the field's text, one line ending off and a newline on (Ruby's chomp + "\n"); a map as
    # Ruby's to_s writes it; an event without the field is not sent
    assert out.records.data == [b"GET / 200\n", b'{"a"=>1}\n', b"plain\n"]
    assert out.keyless == [lines[1]]
    assert [list(out.records.lines_of(i)) for i in range(3)] == [[lines[0]], [lines[2]],
                                                                [lines[3]]]  # fmt: skip
    packed = build_records(lines, aggregate=True, record_max_size=100,
                           shape=shaper("log", None, False))  # fmt: skip
    assert packed.records.data == [b'GET / 200\n{"a"=>1}\nplain\n']
    assert packed.records.lines() == [lines[0], lines[2], lines[3]]


def test_compressed_records_hold_the_line_with_or_without_its_newline() -> None:
    lines = [b'{"n":1}\n', b'{"n":2,"pad":"' + b"x" * 300 + b'"}\n']
    gz = build_records(lines, aggregate=False, record_max_size=1000,
                       shape=shaper(None, "gzip", False))  # fmt: skip
    assert [gzip.decompress(d[:-1]) for d in gz.records.data] == lines
    assert all(d.endswith(b"\n") for d in gz.records.data)
    chomped = build_records(lines, aggregate=False, record_max_size=1000,
                            shape=shaper(None, "zlib", True))  # fmt: skip
    assert [zlib.decompress(d[:-1]) for d in chomped.records.data] == [x[:-1] for x in lines]
    small = build_records(lines, aggregate=False, record_max_size=60,
                          shape=shaper(None, "zlib", False))  # fmt: skip
    assert small.oversize == [] and len(small.records) == 2  # the limit is on what is sent
    assert shaper(None, None, False) is None  # nothing to shape: the lines as they are
