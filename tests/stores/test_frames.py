"""The file store's frame codec: what was written reads back; damage is skipped and counted,
never raised, whatever the bytes."""

from __future__ import annotations

import zlib

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from aggregator.stores.frames import HEADER_SIZE, MAGIC, decode, encode_frame

Written = list[tuple[list[list[object]], list[bytes]]]


def frames_of(written: Written) -> bytes:
    return b"".join(encode_frame(runs, b"".join(lines)) for runs, lines in written)


def batch(tag: str, start: int, n: int) -> tuple[list[list[object]], list[bytes]]:
    lines = [b'{"i":%d,"s":"\\u00e9\\r"}\n' % i for i in range(start, start + n)]
    return [[tag, n, sum(map(len, lines))]], lines


WRITTEN: Written = [batch("a", 0, 3), batch("b.c", 3, 2), ([["a", 1, 3], ["b", 2, 8]],
                    [b"{}\n", b"[1]\n", b'"x"\n'])]  # fmt: skip


def test_frames_read_back_with_their_runs() -> None:
    data = frames_of(WRITTEN)
    out = decode(data, final=True)
    assert [(f.runs, f.lines) for f in out.frames] == [
        ([tuple(r) for r in runs], lines) for runs, lines in WRITTEN
    ]
    assert out.end == len(data) and out.damaged_bytes == out.torn_bytes == 0


def test_a_line_with_a_bare_carriage_return_still_splits_at_newlines_only() -> None:
    lines = [b'{"a":"x\ry"}\n', b"{}\n"]  # not JSON a formatter writes, but never misread
    out = decode(encode_frame([["t", 2, 16]], b"".join(lines)), final=True)
    assert out.frames[0].lines == lines


def test_a_flipped_byte_costs_its_frame_only() -> None:
    data = bytearray(frames_of(WRITTEN))
    second = len(frames_of(WRITTEN[:1]))
    data[second + HEADER_SIZE + 10] ^= 0x55
    out = decode(bytes(data), final=True)
    assert [f.lines for f in out.frames] == [WRITTEN[0][1], WRITTEN[2][1]]
    assert out.damaged_events == 2 and out.damaged_bytes == len(frames_of(WRITTEN[1:2]))


def test_a_cut_end_is_torn_when_final_and_awaited_when_not() -> None:
    data = frames_of(WRITTEN)[:-5]
    final = decode(data, final=True)
    assert len(final.frames) == 2 and final.torn_bytes > 0 and final.damaged_bytes == 0
    partial = decode(data, final=False)
    assert len(partial.frames) == 2 and partial.torn_bytes == partial.damaged_bytes == 0
    assert partial.end == len(frames_of(WRITTEN[:2]))  # read on from there


def test_a_corrupt_length_does_not_hide_the_frames_after_it() -> None:
    data = bytearray(frames_of(WRITTEN))
    data[4:8] = (10_000).to_bytes(4, "little")  # the first frame now claims to run past the end
    out = decode(bytes(data), final=True)
    assert [f.lines for f in out.frames] == [WRITTEN[1][1], WRITTEN[2][1]]
    assert out.damaged_events == 3 and out.torn_bytes == 0


def test_limits_stop_between_frames() -> None:
    data = frames_of(WRITTEN)
    out = decode(data, final=True, max_events=4)
    assert len(out.frames) == 2 and out.end == len(frames_of(WRITTEN[:2]))
    rest = decode(data, out.end, final=True)
    assert len(rest.frames) == 1


def test_a_good_checksum_over_a_payload_that_is_not_ours_is_damage() -> None:
    payload = b"\x05\x00\x00\x00garbage\n"
    frame = MAGIC + len(payload).to_bytes(4, "little") + zlib.crc32(payload).to_bytes(
        4, "little") + payload  # fmt: skip
    out = decode(frame + frames_of(WRITTEN[:1]), final=True)
    assert [f.lines for f in out.frames] == [WRITTEN[0][1]] and out.damaged_events == 1


tags = st.text(min_size=0, max_size=20)
json_lines = st.lists(
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"") + b"\n"),
    min_size=1, max_size=8,
)  # fmt: skip
batches = st.lists(st.tuples(tags, json_lines), min_size=1, max_size=6)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(batches, st.data())
def test_any_damage_decodes_to_the_good_frames_plus_counted_damage(
    written: list[tuple[str, list[bytes]]], data: st.DataObject
) -> None:
    encoded = [encode_frame([[tag, len(lines), sum(map(len, lines))]], b"".join(lines))
               for tag, lines in written]  # fmt: skip
    blob = bytearray(b"".join(encoded))
    kind = data.draw(st.sampled_from(["cut", "flip", "insert", "overwrite"]))
    at = data.draw(st.integers(0, len(blob)))
    if kind == "cut":
        blob = blob[:at]
    elif kind == "flip" and at < len(blob):
        blob[at] ^= data.draw(st.integers(1, 255))
    elif kind == "insert":
        blob[at:at] = data.draw(st.binary(min_size=1, max_size=40))
    elif kind == "overwrite":
        junk = data.draw(st.binary(min_size=1, max_size=40))
        blob[at : at + len(junk)] = junk
    for final in (True, False):
        out = decode(bytes(blob), final=final)  # never raises
        assert 0 <= out.end <= len(blob)
        # Every frame read is one that was written, in the order written.
        expected = [lines for _, lines in written]
        got = [frame.lines for frame in out.frames]
        position = 0
        for lines in got:
            assert lines in expected[position:]
            position = expected.index(lines, position) + 1
        if final:
            assert out.end == len(blob)  # everything is a frame, damage or a torn end
            # Frames untouched by the damage all come back.
            starts = [sum(map(len, encoded[:i])) for i in range(len(encoded) + 1)]
            lo, hi = at, at + 40
            intact = [written[i][1] for i in range(len(encoded))
                      if starts[i + 1] <= lo or (kind != "cut" and starts[i] >= hi)]  # fmt: skip
            for lines in intact:
                assert lines in got


@given(st.binary(max_size=400))
def test_any_bytes_decode_without_an_exception(blob: bytes) -> None:
    for final in (True, False):
        out = decode(blob, final=final)
        assert out.end <= len(blob)
        assert out.damaged_bytes + out.torn_bytes <= len(blob)
