"""Encoding events to JSON lines, with and without inject, and the repair of bad input."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.config.model import Inject
from aggregator.formatting import Formatter, InvalidEvent
from aggregator.protocol import EventTime, ForwardDecoder, encode_forward, encode_packed_forward

PLAIN = Formatter(Inject())


def decode(lines: list[bytes]) -> list[Any]:
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    return [orjson.loads(line) for line in lines]


json_text = st.text(alphabet=st.sampled_from('a,{}[]:"\\\n\r\t\u2028é😀'), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False,
    allow_infinity=False) | json_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_text, inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


INJECTS = [Inject(), Inject(tag_key="tag"), Inject(time_key="t", time_format="epoch_ms"),
           Inject(tag_key="tag", time_key="t", time_format="epoch_ms")]  # fmt: skip


@given(records=st.lists(st.dictionaries(json_text, json_values, max_size=4), max_size=20),
       inject=st.sampled_from(INJECTS))  # fmt: skip
def test_a_slice_in_one_call_gives_each_records_own_line(
    records: list[dict[str, Any]], inject: Inject
) -> None:
    """The fast path encodes a slice in one orjson call and splits it where one record ends:
    no string (commas, braces, newlines, quotes) may move that split."""
    lines, nbytes, invalid, _ = Formatter(inject).encode("t", [[1.25, dict(r)] for r in records])
    expected = []
    for record in records:
        record = dict(record)
        if inject.tag_key:
            record[inject.tag_key] = "t"
        if inject.time_key:
            record[inject.time_key] = 1250
        expected.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
    assert (lines, nbytes, invalid) == (expected, sum(map(len, expected)), 0)


def test_plain_records_and_total_size() -> None:
    lines, nbytes, *_ = PLAIN.encode("t", [[1, {"log": "a"}], [2, {"log": "b", "n": 3}]])
    assert decode(lines) == [{"log": "a"}, {"log": "b", "n": 3}]
    assert nbytes == sum(map(len, lines))


def test_inject_tag_and_iso_time() -> None:
    fmt = Formatter(Inject(tag_key="tag", time_key="time"))
    lines, *_ = fmt.encode("app.web", [[1700000000.25, {"log": "x"}], [1700000001, {"log": "y"}]])
    assert decode(lines) == [
        {"log": "x", "tag": "app.web", "time": "2023-11-14T22:13:20.250Z"},
        {"log": "y", "tag": "app.web", "time": "2023-11-14T22:13:21.000Z"},
    ]


@pytest.mark.parametrize(
    ("fmt", "expected"), [("epoch", 1700000000.5), ("epoch_ms", 1700000000500)]
)
def test_epoch_formats(fmt: Any, expected: float) -> None:
    lines, *_ = Formatter(Inject(time_key="ts", time_format=fmt)).encode("t", [[1700000000.5, {}]])
    assert decode(lines) == [{"ts": expected}]


def test_missing_or_zero_time_means_now() -> None:
    fmt = Formatter(Inject(time_key="ts", time_format="epoch"), clock=lambda: 42.0)
    lines, *_ = fmt.encode("t", [[0, {}], [None, {}], ["junk", {}]])
    assert decode(lines) == [{"ts": 42.0}] * 3


def test_invalid_utf8_is_replaced_not_dropped() -> None:
    # What the msgpack decoder gives for a str holding invalid UTF-8.
    raw = b"\x81\xa3log\xa4ab\xff\xfe"
    record = msgpack.unpackb(raw, raw=False, unicode_errors="surrogateescape")
    for fmt in (PLAIN, Formatter(Inject(tag_key="tag"))):
        lines, *_ = fmt.encode("t", [[1, dict(record)]])
        assert decode(lines)[0]["log"] == "ab\ufffd\ufffd"


def test_bytes_and_ext_values_are_encoded() -> None:
    lines, *_ = PLAIN.encode("t", [[1, {"b": b"hi\xff", "e": msgpack.ExtType(5, b"\x01")}]])
    assert decode(lines) == [{"b": "hi\ufffd", "e": {"ext_type": 5, "data": "01"}}]


def test_non_string_keys() -> None:
    lines, *_ = PLAIN.encode("t", [[1, {1: "one"}]])
    assert decode(lines) == [{"1": "one"}]


BAD_ENTRIES = [[1, "not a map"], [1], "flat", [1, [1, 2]], None]


@pytest.mark.parametrize("bad", BAD_ENTRIES)
def test_a_malformed_entry_is_left_out_and_counted_its_neighbours_kept(bad: Any) -> None:
    for fmt in (PLAIN, Formatter(Inject(tag_key="tag", time_key="time"))):
        encoded = fmt.encode("t", [[1, {"n": 1}], bad, [2, {"n": 2}]])
        assert [e["n"] for e in decode(encoded.lines)] == [1, 2]
        assert encoded.invalid == 1 and encoded.error
        with pytest.raises(InvalidEvent):  # strict: all or nothing
            fmt.encode("t", [[1, {"n": 1}], bad], strict=True)


def deep(levels: int) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for _ in range(levels):
        record = {"d": record}
    return record


@pytest.mark.parametrize("time_format", ["iso8601", "epoch", "epoch_ms"])
def test_unencodable_events_are_left_out_and_counted(time_format: str) -> None:
    """The issue's case: a NaN time, a time past any calendar, nesting deeper than JSON
    encoding allows, among good events in one message."""
    inject = Inject.model_validate({"time_key": "time", "time_format": time_format})
    good = [[1700000000 + i, {"i": i}] for i in range(200)]
    more = [[1700000300 + i, {"i": 300 + i}] for i in range(50)]
    bad = [[float("nan"), {"i": -1}], [1e300, {"i": -2}], [1700000000, deep(300)]]
    encoded = Formatter(inject).encode("app", [*good, *bad, *more])
    # A number of seconds needs no calendar: only the date formats refuse 1e300.
    kept = [-2] if time_format == "epoch" else []
    assert [e["i"] for e in decode(encoded.lines)] == [*range(200), *kept, *range(300, 350)]
    assert encoded.invalid == 3 - len(kept)
    assert encoded.nbytes == sum(map(len, encoded.lines))


def test_binary_map_keys_become_strings() -> None:
    encoded = PLAIN.encode("t", [[1, {b"bin": 1, "s": {b"inner\xff": 2}}]])
    assert decode(encoded.lines) == [{"bin": 1, "s": {"inner\ufffd": 2}}] and not encoded.invalid


def test_a_bad_time_does_not_reuse_the_previous_events_date() -> None:
    fmt = Formatter(Inject(time_key="time"))
    assert decode(fmt.encode("t", [[1700000000.0, {}]]).lines)[0]["time"].startswith("2023-11")
    out = fmt.encode("t", [[1e300, {}], [1700000000.0 + 86400 * 30, {}]])
    assert out.invalid == 1
    assert decode(out.lines)[0]["time"].startswith("2023-12")


def test_extra_entry_elements_are_ignored() -> None:
    lines, *_ = PLAIN.encode("t", [[1, {"a": 1}, "extra"]])
    assert decode(lines) == [{"a": 1}]


@settings(max_examples=300, deadline=None)
@given(
    time_format=st.sampled_from(["iso8601", "epoch", "epoch_ms"]),
    t=st.floats(min_value=1.0, max_value=4e9, allow_nan=False),
    record=st.dictionaries(
        st.text(max_size=5),
        st.one_of(
            st.text(max_size=8),
            st.integers(min_value=-(2**53), max_value=2**53),
            st.booleans(),
            st.none(),
        ),
        max_size=4,
    ),
)
def test_a_line_comes_back_as_an_entry_that_formats_to_the_same_line(
    time_format: str, t: float, record: dict[str, object]
) -> None:
    """What a hand-off relies on: the entry, sent as the hand-off sends it (CompressedPacked-
    Forward) and decoded by a peer, is written by the same inject as the very same line."""
    inject = Inject.model_validate(
        {"tag_key": "tag", "time_key": "time", "time_format": time_format}
    )
    [line], *_ = Formatter(inject).encode("app.web", [[t, dict(record)]])
    entry = Formatter(inject).entry_of(line)
    decoder = ForwardDecoder()
    decoder.receive_data(encode_packed_forward("app.web", [entry], compressed=True))
    message = decoder.next_message()
    assert message is not None
    [same], *_ = Formatter(inject).encode(message.tag, message.entries)
    assert same == line


def test_a_huge_message_is_formatted_in_bounded_slices() -> None:
    """Issue 8: each orjson result is a 4 KiB allocation, and a message of 100,000 tiny events
    held all of them (410 MiB) until one join."""
    import tracemalloc

    entries = [[1, {"i": i}] for i in range(100_000)]
    entries[50_000] = [1, "not a map"]
    tracemalloc.start()
    try:
        encoded = Formatter(Inject(tag_key="tag")).encode("t", entries)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(encoded.lines) == 99_999 and encoded.invalid == 1
    assert encoded.nbytes == sum(map(len, encoded.lines))
    around = decode(encoded.lines[49_999:50_001])
    assert around == [{"i": 49_999, "tag": "t"}, {"i": 50_001, "tag": "t"}]
    assert peak < 32 * 1024 * 1024, f"peak {peak >> 20} MiB"


@pytest.mark.parametrize("events", [1, 2, 300])
def test_kept_lines_cost_their_size_not_orjsons_allocation(events: int) -> None:
    """One event per batch (Docker's driver, one message per read) kept orjson's 4 KiB
    allocation per 300-byte line: a buffer held 12x what it counted."""
    import tracemalloc

    record = {"container_id": "a" * 64, "source": "stdout", "log": "x" * 150}
    batches = 3000 // events
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        kept = [PLAIN.encode("t", [[1, dict(record)] for _ in range(events)]).lines
                for _ in range(batches)]  # fmt: skip
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    lines = sum(map(len, kept))
    assert lines == batches * events
    assert held / lines < 600, f"{held / lines:.0f} bytes held per {len(kept[0][0])}-byte line"


def test_event_times_as_decoded_are_read_where_written() -> None:
    """The decoder keeps EventTimes undecoded; the formatter reads the ones it writes: the
    injected time, one inside a record (its seconds, as Fluentd writes it), and any other ext
    value as its type and data. A time that is not an EventTime of 8 bytes means now."""
    eight = struct.pack(">II", 1_700_000_000, 500_000_000)
    entries = [
        [slice(0, eight), {"at": slice(0, eight), "e": slice(5, b"xyz")}],
        [slice(0, b"1234"), {}],  # a cut EventTime
        [slice(7, eight), {}],  # another ext type
    ]
    fmt = Formatter(Inject(time_key="time", time_format="epoch"), clock=lambda: 42.0)
    lines, _, invalid, _ = fmt.encode("t", entries)
    assert invalid == 0
    assert decode(lines) == [
        {"at": 1_700_000_000.5, "e": {"ext_type": 5, "data": "78797a"}, "time": 1_700_000_000.5},
        {"time": 42.0},
        {"time": 42.0},
    ]
    decoder = ForwardDecoder()
    decoder.receive_data(encode_forward("t", [(EventTime(1_700_000_000, 500_000_000), {})]))
    message = decoder.next_message()
    assert message is not None
    assert decode(fmt.encode("t", message.entries).lines) == [{"time": 1_700_000_000.5}]
