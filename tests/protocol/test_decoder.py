"""ForwardDecoder: every mode, any read split, limits, and each ProtocolError reason."""

from __future__ import annotations

import gzip
import itertools
import struct
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.protocol import (
    PROTOCOL_ERROR_REASONS,
    EventTime,
    ForwardDecoder,
    Message,
    ProtocolError,
    encode_forward,
    encode_message,
    encode_packed_forward,
    pack_entries,
)
from aggregator.protocol.decoder import INITIAL_BUFFER_SIZE, gunzip
from aggregator.protocol.events import event_seconds

# --- helpers and strategies -------------------------------------------------------------------

tags = st.text(min_size=1, max_size=40)
ascii_tags = st.from_regex(r"[a-z][a-z0-9_.]{0,30}", fullmatch=True)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.binary(max_size=30)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
records = st.dictionaries(st.text(max_size=12), values, max_size=5)
times = (
    st.integers(min_value=0, max_value=2**32 - 1)
    | st.floats(min_value=0, max_value=2**32, allow_nan=False)
    | st.builds(
        EventTime,
        st.integers(min_value=0, max_value=2**32 - 1),
        st.integers(min_value=0, max_value=999_999_999),
    )
)
entry_lists = st.lists(st.tuples(times, records), max_size=8)
base64ish = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789+/=\n"  # out_forward's ids end in \n
chunks = st.none() | st.text(alphabet=base64ish, max_size=25)


def expected_time(t: int | float | EventTime) -> int | float | slice:
    """An entry's time as decoded: an EventTime stays as its ext value (events.event_seconds)."""
    if isinstance(t, EventTime):
        return slice(0, struct.pack(">II", t.seconds, t.nanoseconds))
    return t


def expected_entries(entries: list[tuple[Any, Any]]) -> list[list[Any]]:
    return [[expected_time(t), r] for t, r in entries]


def decode_all(data: bytes, max_message_size: int = 32 * 1024 * 1024) -> list[Message]:
    decoder = ForwardDecoder(max_message_size)
    decoder.receive_data(data)
    return drain(decoder)


def drain(decoder: ForwardDecoder) -> list[Message]:
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


def decode_one(data: bytes, max_message_size: int = 32 * 1024 * 1024) -> Message:
    [message] = decode_all(data, max_message_size)
    return message


def raises_reason(reason: str, data: bytes, max_message_size: int = 1024 * 1024) -> ProtocolError:
    assert reason in PROTOCOL_ERROR_REASONS
    with pytest.raises(ProtocolError) as info:
        decode_all(data, max_message_size)
    assert info.value.reason == reason
    return info.value


def pack(obj: Any) -> bytes:
    # surrogateescape lets a test put invalid UTF-8 on the wire inside a msgpack str
    packed: bytes = msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogateescape")
    return packed


def str_header(n: int) -> bytes:
    """A msgpack str header of the smallest size class, as any client would pick."""
    if n < 32:
        return bytes([0xA0 | n])
    if n < 0x100:
        return b"\xd9" + bytes([n])
    if n < 0x10000:
        return b"\xda" + struct.pack(">H", n)
    return b"\xdb" + struct.pack(">I", n)


def packed_forward_as_str(tag: str, payload: bytes, option: dict[str, Any]) -> bytes:
    """A PackedForward message whose payload is a msgpack str, as Fluentd's out_forward sends."""
    return b"\x93" + pack(tag) + str_header(len(payload)) + payload + pack(option)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


# --- the four modes ---------------------------------------------------------------------------


@settings(max_examples=100)
@given(tags, times, records, chunks)
def test_message_mode_round_trip(tag: str, time: Any, record: Any, chunk: str | None) -> None:
    data = encode_message(tag, time, record, chunk=chunk)
    message = decode_one(data)
    assert message == Message(tag, [[expected_time(time), record]], chunk, len(data))


@settings(max_examples=100)
@given(tags, entry_lists, chunks)
def test_forward_mode_round_trip(tag: str, entries: Any, chunk: str | None) -> None:
    data = encode_forward(tag, entries, chunk=chunk)
    message = decode_one(data)
    assert message == Message(tag, expected_entries(entries), chunk, len(data))


@settings(max_examples=100)
@given(tags, entry_lists, chunks, st.booleans())
def test_packed_forward_round_trip(
    tag: str, entries: Any, chunk: str | None, compressed: bool
) -> None:
    data = encode_packed_forward(tag, entries, chunk=chunk, compressed=compressed)
    message = decode_one(data)
    assert message == Message(tag, expected_entries(entries), chunk, len(data))


@pytest.mark.parametrize("count", [1, 3, 200, 2000])  # str8/fixstr, str16 and str32 headers
def test_packed_forward_payload_sent_as_str(count: int) -> None:
    entries = [(EventTime(1_700_000_000, i), {"log": f"line {i}", "n": i}) for i in range(count)]
    payload = pack_entries(entries)
    chunk = "cXVpdGUgYSBjaHVuayBpZA==\n"  # out_forward's Base64.encode64 ends with a newline
    data = packed_forward_as_str(
        "app.web", payload, {"size": count, "compressed": "text", "chunk": chunk}
    )
    message = decode_one(data)
    assert message == Message("app.web", expected_entries(entries), chunk, len(data))


def test_compressed_packed_forward_payload_sent_as_str() -> None:
    entries = [(1, {"k": "v" * 100})] * 50
    payload = gz(pack_entries(entries))
    data = packed_forward_as_str("t", payload, {"size": 50, "compressed": "gzip"})
    assert decode_one(data).entries == expected_entries(entries)


def test_multi_member_gzip() -> None:
    # Fluentd gzips each append to a buffer chunk on its own: one payload, several members.
    first = [(1, {"a": 1}), (2, {"b": 2})]
    second = [(3, {"c": "x" * 1000})]
    third = [(4.5, {"d": None})]
    payload = b"".join(gz(pack_entries(part)) for part in (first, second, third))
    data = pack(["t", payload, {"compressed": "gzip", "size": 4}])
    assert decode_one(data).entries == expected_entries(first + second + third)


def test_empty_packed_forward_still_carries_its_ack() -> None:
    for payload in (b"", gz(b"")):
        compressed = "gzip" if payload else None
        message = decode_one(pack(["t", payload, {"chunk": "c1", "compressed": compressed}]))
        assert message.entries == []
        assert message.chunk == "c1"


def test_forward_entries_are_handed_through_unvalidated() -> None:
    # The formatter checks entries one by one later; the decoder must not spend time on them.
    entries: list[Any] = [[1, {"ok": 1}], "not an entry", [None, None], [1]]
    assert decode_one(pack(["t", entries])).entries == entries


def test_option_may_be_nil_and_unknown_keys_are_ignored() -> None:
    assert decode_one(pack(["t", 1, {"a": 1}, None])).chunk is None
    assert decode_one(pack(["t", [[1, {}]], None])).chunk is None
    data = pack(["t", [[1, {}]], {"size": 1, "future": [1, 2], 7: "x", "chunk": "id"}])
    assert decode_one(data).chunk == "id"


def test_chunk_sent_as_bin_is_read_as_str() -> None:
    assert decode_one(pack(["t", 1, {}, {"chunk": b"abc=="}])).chunk == "abc=="


def test_nil_heartbeat_is_skipped_and_not_counted() -> None:
    message = encode_message("t", 1, {})
    [only] = decode_all(b"\xc0" + message + b"\xc0")
    assert only.nbytes == len(message)


# --- times ------------------------------------------------------------------------------------


def test_integer_and_float_times_keep_their_type() -> None:
    [[t_int, _]] = decode_one(encode_message("t", 1_700_000_000, {})).entries
    [[t_float, _]] = decode_one(encode_message("t", 1_700_000_000.25, {})).entries
    assert type(t_int) is int and t_int == 1_700_000_000
    assert type(t_float) is float and t_float == 1_700_000_000.25


def test_event_time_reads_as_float_seconds() -> None:
    data = encode_forward("t", [(EventTime(1_700_000_000, 123_456_789), {}), (EventTime(1, 1), {})])
    [first, second] = [event_seconds(t) for t, _ in decode_one(data).entries]
    assert type(first) is float
    assert first == 1_700_000_000 + 123_456_789 / 1e9
    assert abs(first - 1_700_000_000.123456789) < 1e-6  # a float's precision at today's epoch
    assert second == 1.000000001


def test_event_time_in_fixext8_and_ext8_forms() -> None:
    body = struct.pack(">II", 10, 500_000_000)
    for ext in (b"\xd7\x00" + body, b"\xc7\x08\x00" + body):  # fixext 8 and ext 8
        data = b"\x93" + pack("t") + ext + pack({})
        [[t, record]] = decode_one(data).entries
        assert (event_seconds(t), record) == (10.5, {})


def test_fluent_logger_python_event_time() -> None:
    from fluent.sender import EventTime as LoggerEventTime

    data = msgpack.packb(("app.web", LoggerEventTime(1_700_000_000.5), {"a": "b"}))
    [[t, record]] = decode_one(data).entries
    assert (event_seconds(t), record) == (1_700_000_000.5, {"a": "b"})


def test_other_ext_types_are_left_alone() -> None:
    ext = msgpack.ExtType(5, b"xyz")
    assert decode_one(pack(["t", 1, {"e": ext}])).entries == [[1, {"e": slice(5, b"xyz")}]]
    assert event_seconds(slice(5, b"12345678")) is None


# --- invalid UTF-8 ----------------------------------------------------------------------------


def test_invalid_utf8_in_record_strings_survives_as_surrogates() -> None:
    data = pack(["t", [[1, {"log": "bad \udcff\udcfe byte", "k\udcc3": 1}]]])
    [[_, record]] = decode_one(data).entries
    assert record == {"log": "bad \udcff\udcfe byte", "k\udcc3": 1}
    assert record["log"].encode("utf-8", "surrogateescape") == b"bad \xff\xfe byte"


def test_invalid_utf8_in_tag_is_replaced() -> None:
    assert decode_one(pack(["app.\udcff.web", 1, {}])).tag == "app.\ufffd.web"
    assert decode_one(pack(["caf\u00e9", 1, {}])).tag == "caf\u00e9"  # valid non-ASCII is kept


def test_tag_sent_as_bin_is_accepted() -> None:
    assert decode_one(pack([b"app.web", 1, {}])).tag == "app.web"


# --- streaming --------------------------------------------------------------------------------

any_message = st.one_of(
    st.builds(
        lambda t, tm, r, c: encode_message(t, tm, r, chunk=c), ascii_tags, times, records, chunks
    ),
    st.builds(lambda t, e, c: encode_forward(t, e, chunk=c), ascii_tags, entry_lists, chunks),
    st.builds(
        lambda t, e, c, z: encode_packed_forward(t, e, chunk=c, compressed=z),
        ascii_tags,
        entry_lists,
        chunks,
        st.booleans(),
    ),
)


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[Message]:
    decoder = ForwardDecoder()
    out: list[Message] = []
    start = 0
    for end in [*sorted(set(cuts)), len(data)]:
        decoder.receive_data(data[start:end])
        out.extend(drain(decoder))
        start = end
    assert decoder.pending_bytes == 0
    return out


@settings(max_examples=100)
@given(st.lists(any_message, min_size=1, max_size=6), st.data())
def test_arbitrary_read_splits(wire: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(wire)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    whole = decode_all(stream)
    assert [m.nbytes for m in whole] == [len(w) for w in wire]
    assert feed_in_pieces(stream, cuts) == whole


def test_one_byte_at_a_time() -> None:
    wire = [
        encode_message("a", EventTime(5, 6), {"x": "y"}, chunk="c1"),
        encode_forward("b", [(1, {"n": i}) for i in range(5)]),
        encode_packed_forward("c", [(2.5, {"s": "z" * 300})] * 3, compressed=True, chunk="c2"),
        packed_forward_as_str("d", pack_entries([(3, {"k": "\u00e9"})] * 4), {"size": 4}),
    ]
    stream = b"".join(wire)
    messages = feed_in_pieces(stream, list(range(len(stream))))
    assert [m.tag for m in messages] == ["a", "b", "c", "d"]
    assert [m.chunk for m in messages] == ["c1", None, "c2", None]
    assert [m.nbytes for m in messages] == [len(w) for w in wire]
    assert messages[3].entries == [[3, {"k": "\u00e9"}]] * 4


def test_many_messages_in_one_read() -> None:
    wire = [encode_forward(f"tag.{i}", [(i, {"i": i})]) for i in range(2000)]
    messages = decode_all(b"".join(wire))
    assert [m.tag for m in messages] == [f"tag.{i}" for i in range(2000)]
    assert [m.entries for m in messages] == [[[i, {"i": i}]] for i in range(2000)]


def test_stop_mid_stream_and_resume() -> None:
    # Backpressure: the caller stops pulling with messages buffered, reads more, then resumes.
    decoder = ForwardDecoder()
    first = b"".join(encode_message(f"m{i}", i, {}) for i in range(3))
    decoder.receive_data(first + encode_message("m3", 3, {})[:4])
    assert decoder.next_message().tag == "m0"  # type: ignore[union-attr]
    decoder.receive_data(encode_message("m3", 3, {})[4:] + encode_message("m4", 4, {}))
    assert [m.tag for m in drain(decoder)] == ["m1", "m2", "m3", "m4"]
    assert decoder.next_message() is None


def test_pending_bytes_counts_a_cut_message() -> None:
    decoder = ForwardDecoder()
    data = encode_forward("t", [(1, {"a": "b"})])
    decoder.receive_data(data[:-1])
    assert decoder.next_message() is None
    assert decoder.pending_bytes == len(data) - 1
    decoder.receive_data(data[-1:])
    assert decoder.next_message() is not None
    assert decoder.pending_bytes == 0


def test_big_reads_decode_across_buffer_renewals() -> None:
    # Reads far over the initial buffer, some ending between messages (the unpacker is renewed
    # there) and some inside one (it must not be): every message comes out once, in order.
    wire = b"".join(encode_message("big", i, {"log": "x" * 300}) for i in range(3000))
    decoder = ForwardDecoder()
    out: list[Message] = []
    size = len(encode_message("big", 0, {"log": "x" * 300}))
    cuts = [0, 400 * size, 1000 * size + 7, 2500 * size, len(wire)]
    for start, end in itertools.pairwise(cuts):
        decoder.receive_data(wire[start:end])
        out += drain(decoder)
    assert [m.entries[0][0] for m in out] == list(range(3000))
    assert decoder.pending_bytes == 0


def test_an_idle_decoder_gives_back_what_a_big_read_grew() -> None:
    # An unpacker's buffer grows to hold a read and never shrinks by itself: with thousands of
    # connections, each keeping its biggest read would be memory outside every limit.
    wire = b"".join(encode_message("big", i, {"log": "x" * 300}) for i in range(1000))
    assert len(wire) > 4 * INITIAL_BUFFER_SIZE
    tracemalloc.start()
    try:
        decoders = [ForwardDecoder() for _ in range(20)]
        before = tracemalloc.get_traced_memory()[0]  # what a new decoder holds is not counted
        for decoder in decoders:
            decoder.receive_data(wire)
            assert len(drain(decoder)) == 1000
        held = (tracemalloc.get_traced_memory()[0] - before) / len(decoders)
    finally:
        tracemalloc.stop()
    assert held < INITIAL_BUFFER_SIZE, f"an idle decoder holds {held:.0f} bytes"


def test_empty_read_is_harmless() -> None:
    decoder = ForwardDecoder()
    decoder.receive_data(b"")
    assert decoder.next_message() is None


# --- size limits ------------------------------------------------------------------------------


def test_message_at_the_limit_decodes_and_one_byte_over_does_not() -> None:
    data = encode_forward("t", [(1, {"log": "x" * 5000})])
    assert decode_one(data, max_message_size=len(data)).nbytes == len(data)
    raises_reason("message_too_large", data, max_message_size=len(data) - 1)


def test_limit_applies_across_reads() -> None:
    decoder = ForwardDecoder(1000)
    data = encode_message("t", 1, {"log": "x" * 2000})
    decoder.receive_data(data[:900])
    assert decoder.next_message() is None
    decoder.receive_data(data[900:])
    with pytest.raises(ProtocolError) as info:
        decoder.next_message()
    assert info.value.reason == "message_too_large"


def test_messages_before_a_too_large_one_in_the_same_read_are_decoded() -> None:
    small = [encode_message("ok", 1, {"i": i}) for i in range(5)]
    big = encode_message("big", 1, {"log": "x" * 5000})
    decoder = ForwardDecoder(1000)
    decoder.receive_data(b"".join(small) + big)
    for i in range(5):
        message = decoder.next_message()
        assert message is not None and message.entries[0][1]["i"] == i
    with pytest.raises(ProtocolError) as info:
        decoder.next_message()
    assert info.value.reason == "message_too_large"


def test_the_limit_is_per_message_not_per_read() -> None:
    ones = b"".join(encode_message("t", 1, {"log": "x" * 300}) for _ in range(20))
    decoder = ForwardDecoder(1000)
    decoder.receive_data(ones)  # 20 small messages in one read, far over the limit in all
    assert len(list(iter(decoder.next_message, None))) == 20


def test_limit_resets_after_each_message() -> None:
    one = encode_message("t", 1, {"log": "x" * 600})
    decoder = ForwardDecoder(1000)
    for _ in range(5):
        decoder.receive_data(one)
        assert decoder.next_message() is not None


def test_huge_array_header_is_too_large() -> None:
    raises_reason("message_too_large", b"\xdd\xff\xff\xff\xff")


def test_decompression_bomb() -> None:
    bomb = gz(b"\0" * (8 * 1024 * 1024))  # about 8 KiB on the wire
    data = pack(["t", bomb, {"compressed": "gzip"}])
    assert len(data) < 64 * 1024
    raises_reason("message_too_large", data, max_message_size=1024 * 1024)


def test_decompression_bomb_spread_over_members() -> None:
    members = gz(b"\0" * 400_000) * 3  # each member is under the limit, together over it
    raises_reason("message_too_large", pack(["t", members, {"compressed": "gzip"}]), 1_000_000)


# --- every error reason -----------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"\xc1", b"\x92\xa1t\xc1", b"\x91" * 5000, b"\x81\x91\x01\x02"])
def test_not_msgpack(data: bytes) -> None:
    raises_reason("not_msgpack", data)


@pytest.mark.parametrize(
    "obj",
    [
        {"tag": "t"},  # not an array
        "t",
        ["t"],  # too short
        ["t", 1, {}, {}, {}],  # too long
        ["t", 1],  # Message mode without a record
        ["t", [[1, {}]], {}, {}],  # Forward mode with an extra item
        ["t", b"", {}, {}],  # PackedForward with an extra item
        ["t", None, {}],  # no mode has a nil second element
        ["t", {"a": 1}],
        ["t", True, {}],  # a bool is not a time
        ["t", msgpack.ExtType(3, b"12345678"), {}],
        ["t", 1, {}, "option"],  # option not a map
        ["t", [[1, {}]], [1]],
        ["t", 1, {}, {"chunk": 12}],  # chunk not a string
        ["t", [], {"chunk": ["x"]}],
        ["t", b"\xc1", {}],  # packed entries that are not msgpack
        ["t", pack([1, {}]) + pack([2, {}])[:-1], {}],  # packed entries with a cut tail
        ["t", b"\x92\xd7\x00\x00\x00\x00\x01\x80", {}],  # fixext 8 cut: not 8 bytes of EventTime
    ],
)
def test_bad_shape(obj: Any) -> None:
    raises_reason("bad_shape", pack(obj))


def test_event_time_of_the_wrong_length_is_bad_shape() -> None:
    raises_reason("bad_shape", b"\x93" + pack("t") + b"\xd6\x00" + b"\0" * 4 + pack({}))


@pytest.mark.parametrize("tag", [1, None, "", b"", ["a"], {"a": 1}])
def test_bad_tag(tag: Any) -> None:
    raises_reason("bad_tag", pack([tag, 1, {}]))


@pytest.mark.parametrize(
    "obj",
    [
        ["t", b"not gzip at all", {"compressed": "gzip"}],
        ["t", gz(pack_entries([(1, {})]))[:-6], {"compressed": "gzip"}],  # truncated member
        ["t", gz(pack_entries([(1, {})])) + b"junk", {"compressed": "gzip"}],
        ["t", pack_entries([(1, {})]), {"compressed": "zstd"}],
        ["t", pack_entries([(1, {})]), {"compressed": 1}],
    ],
)
def test_bad_compression(obj: Any) -> None:
    raises_reason("bad_compression", pack(obj))


def test_decoder_is_dead_after_an_error() -> None:
    decoder = ForwardDecoder()
    decoder.receive_data(pack(["", 1, {}]) + encode_message("fine", 1, {}))
    for call in (decoder.next_message, lambda: decoder.receive_data(b"\x90")):
        with pytest.raises(ProtocolError) as info:
            call()
        assert info.value.reason == "bad_tag"


def test_error_names_reason_and_detail() -> None:
    error = raises_reason("bad_tag", pack([3, 1, {}]))
    assert str(error).startswith("bad_tag: ")
    assert error.detail


# --- batches ----------------------------------------------------------------------------------


def test_batch_merges_consecutive_messages_with_the_same_tag() -> None:
    data = b"".join(
        [
            encode_message("a", 1, {"i": 0}, chunk="c0"),
            encode_message("a", 2, {"i": 1}),
            encode_forward("a", [(3, {"i": 2}), (4, {"i": 3})], chunk="c2"),
            encode_message("b", 5, {"i": 4}),
            encode_message("a", 6, {"i": 5}),
        ]
    )
    decoder = ForwardDecoder()
    decoder.receive_data(data)
    first = decoder.next_batch()
    assert first is not None
    assert (first.tag, [e[1]["i"] for e in first.entries]) == ("a", [0, 1, 2, 3])
    assert first.chunks == ["c0", "c2"]
    second, third = decoder.next_batch(), decoder.next_batch()
    assert second is not None and third is not None
    assert [(b.tag, len(b.entries)) for b in (second, third)] == [("b", 1), ("a", 1)]
    assert first.nbytes + second.nbytes + third.nbytes == len(data)
    assert decoder.next_batch() is None


few_tags = st.sampled_from(["a", "b"])  # so that neighbours often share their tag
message_or_forward = st.one_of(
    st.builds(
        lambda t, tm, r, c: encode_message(t, tm, r, chunk=c), few_tags, times, records, chunks
    ),
    st.builds(lambda t, e, c: encode_forward(t, e, chunk=c), few_tags, entry_lists, chunks),
)


@settings(max_examples=200)
@given(st.lists(message_or_forward, min_size=1, max_size=10), st.data())
def test_batches_hold_exactly_what_the_messages_hold(
    wire: list[bytes], data: st.DataObject
) -> None:
    """next_batch's inline path (Message mode, with or without a chunk id) against the general
    one: the same entries, chunk ids and bytes, merged by consecutive tag, at any read split."""
    stream = b"".join(wire)
    expected: list[tuple[str, list[Any], list[str], int]] = []
    for m in decode_all(stream):
        if expected and expected[-1][0] == m.tag:
            expected[-1][1].extend(m.entries)
            expected[-1][2].extend([] if m.chunk is None else [m.chunk])
            expected[-1] = (m.tag, expected[-1][1], expected[-1][2], expected[-1][3] + m.nbytes)
        else:
            ids = [] if m.chunk is None else [m.chunk]
            expected.append((m.tag, list(m.entries), ids, m.nbytes))
    decoder = ForwardDecoder()
    decoder.receive_data(stream)  # all at once: batches merge across every message
    got = [(b.tag, b.entries, b.chunks, b.nbytes) for b in iter(decoder.next_batch, None)]
    assert got == expected
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder, start = ForwardDecoder(), 0
    entries: list[Any] = []
    chunk_ids: list[str] = []
    for end in [*cuts, len(stream)]:  # in pieces: batches end with a read, nothing is lost
        decoder.receive_data(stream[start:end])
        start = end
        for batch in iter(decoder.next_batch, None):
            entries += batch.entries
            chunk_ids += batch.chunks
    assert entries == [e for _, es, _, _ in expected for e in es]
    assert chunk_ids == [c for _, _, cs, _ in expected for c in cs]


def test_batch_stops_at_the_entry_limit() -> None:
    decoder = ForwardDecoder()
    decoder.receive_data(b"".join(encode_message("t", 1, {"i": i}) for i in range(10)))
    sizes = [len(b.entries) for b in iter(lambda: decoder.next_batch(max_entries=4), None)]
    assert sizes == [4, 4, 2]


def test_bad_input_after_a_batch_is_raised_by_the_next_call() -> None:
    decoder = ForwardDecoder()
    decoder.receive_data(encode_message("t", 1, {"i": 0}) + b"\xc1")
    batch = decoder.next_batch()
    assert batch is not None and len(batch.entries) == 1
    with pytest.raises(ProtocolError) as info:
        decoder.next_batch()
    assert info.value.reason == "not_msgpack"


def test_many_tiny_gzip_members_never_copy_the_rest_of_the_payload() -> None:
    """Issue 8: 4 MiB of empty 20-byte members took seconds per MiB because every member left
    the whole rest of the payload to be copied; its peak allocation shows that copy."""
    member = gzip.compress(b"", mtime=0)
    payload = member * (4 * 1024 * 1024 // len(member)) + gzip.compress(b"tail", mtime=0)
    tracemalloc.start()
    try:
        assert gunzip(payload, 1024) == b"tail"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"peak {peak} bytes: the rest of the payload was copied"


@pytest.mark.parametrize("sizes", [[0], [1], [100_000, 0, 5], [3] * 50, [70_000, 200_000]])
def test_gzip_members_of_any_size_decode_to_their_concatenation(sizes: list[int]) -> None:
    chunks = [bytes([65 + i % 26]) * n for i, n in enumerate(sizes)]
    payload = b"".join(gzip.compress(c, mtime=0) for c in chunks)
    assert gunzip(payload, 10**7) == b"".join(chunks)
    with pytest.raises(ProtocolError, match="truncated"):
        gunzip(payload[:-3], 10**7)


def test_a_compressed_bomb_is_refused_at_the_entries_limit_in_bounded_memory() -> None:
    """Issue 8: 8 KiB of gzip that inflates to 2.8 M `[0,{}]` entries took a worker to 12 GB."""
    payload = gzip.compress(b"\x92\x00\x80" * (8 * 1024 * 1024 // 3), mtime=0)
    assert len(payload) < 64 * 1024
    message = msgpack.packb(["bomb", payload, {"compressed": "gzip"}], use_bin_type=True)
    decoder = ForwardDecoder(max_entries=10_000)
    tracemalloc.start()
    try:
        decoder.receive_data(message)
        with pytest.raises(ProtocolError) as err:
            decoder.next_message()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.reason == "message_too_large" and "10000 entries" in err.value.detail
    assert peak < 48 * 1024 * 1024, f"peak {peak >> 20} MiB"  # the inflated 8 MiB, no more


@pytest.mark.parametrize(
    "head",
    [
        b"\xdd\xff\xff\xff\xff",  # a never-finished array32 of 4 G items
        b"\x93\xa3tag\xce\x65\x53\xf1\x00\xdf\x00\x10\x00\x00",  # a record map of 1 M keys
        b"\x93\xa3tag\xdd\x00\x10\x00\x00",  # Forward mode with 1 M entries
    ],
)
def test_containers_over_the_entries_limit_are_refused_before_they_are_built(head: bytes) -> None:
    decoder = ForwardDecoder(max_entries=1000)
    decoder.receive_data(head + b"\x80" * 64)
    with pytest.raises(ProtocolError) as err:
        decoder.next_message()
    assert err.value.reason == "message_too_large"


def test_packed_entries_up_to_the_limit_pass() -> None:
    entries = [[1700000000, {"i": i}] for i in range(1000)]
    decoder = ForwardDecoder(max_entries=1000)
    decoder.receive_data(encode_packed_forward("t", entries, compressed=True))
    message = decoder.next_message()
    assert message is not None and len(message.entries) == 1000
    decoder = ForwardDecoder(max_entries=999)
    decoder.receive_data(encode_packed_forward("t", entries))
    with pytest.raises(ProtocolError, match="over 999 entries"):
        decoder.next_message()


def test_idle_decoders_share_a_few_unpackers() -> None:
    """An msgpack Unpacker costs about 40 KiB: a decoder with nothing partly received holds
    none, and one that has part of a message keeps its own until the message is whole."""
    message = encode_message("t", 1, {"log": "x" * 100})
    decoders = [ForwardDecoder() for _ in range(50)]
    held = set()
    for decoder in decoders:
        decoder.receive_data(message + message[:10])  # one whole message and part of one
        batch = decoder.next_batch()
        assert batch is not None and len(batch.entries) == 1
        assert decoder.next_batch() is None
        held.add(id(decoder._unpacker))
    assert len(held) == 50  # each keeps the one its partial message is in
    for decoder in decoders:
        decoder.receive_data(message[10:])
        batch = decoder.next_batch()
        assert batch is not None and batch.entries[0][1] == {"log": "x" * 100}
        assert decoder.next_batch() is None and decoder.pending_bytes == 0
    assert not any(hasattr(d._unpacker, "feed") for d in decoders)  # all given back
    for decoder in decoders:  # and taken again: each stream still decodes on its own
        decoder.receive_data(message * 2)
        assert [len(b.entries) for b in iter(decoder.next_batch, None)] == [2]
