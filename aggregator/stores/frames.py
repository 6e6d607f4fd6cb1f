"""The file store's on-disk format, sans-IO: frames of encoded lines in, bytes out, and back.

A segment file starts with :data:`SEGMENT_HEADER`, then holds frames back to back::

    frame   = MAGIC (4) | payload length (u32 LE) | CRC-32 of the payload (u32 LE) | payload
    payload = runs length (u32 LE) | runs: msgpack [[tag, count, bytes], ...] | the lines

One frame is one group write: what a destination took in one turn of the event loop, in order,
its lines grouped in runs of one tag (the hand-off needs the tags, the tenants' buffer shares
their bytes). Every line
is one event's JSON and ends with its only raw newline, so the lines split back exactly.

Reading never raises, whatever the bytes: a frame whose magic, length or checksum does not hold
is damage, skipped up to the next magic that starts a good frame and counted (the events it held
estimated by its line ends); a frame cut by the end of the data is a torn tail when the data
ends there for good, else the reader asks for more.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack

SEGMENT_HEADER = b"AGGSEG1\n"
"""The first bytes of every segment file: the format and its version."""
MAGIC = b"\xffAGF"
"""Where a frame starts (0xFF is never in UTF-8 text, and the checksum settles the rest)."""
_HEADER = struct.Struct("<4sII")
_RUNS_LENGTH = struct.Struct("<I")
HEADER_SIZE = _HEADER.size
MAX_PAYLOAD = 1 << 30
"""A frame claiming more than this is damage (a group write holds about a chunk)."""

Run = tuple[str, int, int]
"""``(tag, count, nbytes)``: ``count`` consecutive lines of one tag, ``nbytes`` long."""


def frame_parts(runs: list[list[Any]], body: bytes) -> list[bytes]:
    """The frame of ``body`` (the lines, joined) and its ``[[tag, count, bytes], ...]`` runs,
    as parts to write with one ``os.writev``: the lines are not copied again."""
    runs_bytes = msgpack.packb(runs, unicode_errors="surrogateescape")
    runs_length = _RUNS_LENGTH.pack(len(runs_bytes))
    crc = zlib.crc32(body, zlib.crc32(runs_bytes, zlib.crc32(runs_length)))
    length = len(runs_length) + len(runs_bytes) + len(body)
    return [_HEADER.pack(MAGIC, length, crc), runs_length, runs_bytes, body]


def encode_frame(runs: list[list[Any]], body: bytes) -> bytes:
    """One frame as bytes (tests and tools; the store writes :func:`frame_parts`)."""
    return b"".join(frame_parts(runs, body))


@dataclass(slots=True)
class Frame:
    runs: list[Run]
    lines: list[bytes]
    start: int
    end: int
    """Offsets of the frame in the data it was read from: ``end`` is where the next begins."""


@dataclass(slots=True)
class Decoded:
    frames: list[Frame] = field(default_factory=list)
    end: int = 0
    """Where reading stopped: all before it is frames or damage; from it on, more data is
    needed (when not ``final``)."""
    damaged_bytes: int = 0
    damaged_events: int = 0
    """Line ends in the damaged bytes: about the events they held."""
    torn_bytes: int = 0
    """A frame cut by the end of final data: a write that never completed."""
    torn_events: int = 0


def decode(
    data: bytes, start: int = 0, *, final: bool, max_events: int | None = None,
    max_bytes: int | None = None,
) -> Decoded:  # fmt: skip
    """Frames from ``data[start:]``. ``final``: the data ends here for good (the end of a
    segment), so a frame cut short is a torn tail; otherwise reading stops before it. Stops
    early, between frames, once the frames read hold ``max_events`` lines or ``max_bytes``."""
    out = Decoded(end=start)
    pos, size = start, len(data)
    events = nbytes = 0
    while pos < size:
        if (max_events is not None and events >= max_events) or (
            max_bytes is not None and nbytes >= max_bytes
        ):
            break
        status, frame = _frame_at(data, pos)
        if frame is not None:
            out.frames.append(frame)
            events += len(frame.lines)
            nbytes += frame.end - frame.start
            pos = frame.end
            continue
        if status == _SHORT and not final:
            break  # the rest of it is in data not read yet
        resume = _resync(data, pos + 1, final)
        if resume is None and status == _SHORT:
            _count(out, "torn", data, pos, size)  # the last write, cut: never acknowledged
            pos = size
            break
        end = size if resume is None else resume
        _count(out, "damaged", data, pos, end)
        pos = end
    out.end = pos
    return out


_OK, _SHORT, _BAD = range(3)


def _frame_at(data: bytes, pos: int) -> tuple[int, Frame | None]:
    """Whether a good frame starts at ``pos``: _OK with it, _SHORT when it may but the data
    ends first, _BAD when none can."""
    if len(data) - pos < HEADER_SIZE:
        return (_SHORT if MAGIC.startswith(data[pos : pos + len(MAGIC)]) else _BAD), None
    magic, length, crc = _HEADER.unpack_from(data, pos)
    if magic != MAGIC or length > MAX_PAYLOAD:
        return _BAD, None
    end = pos + HEADER_SIZE + length
    if end > len(data):
        return _SHORT, None
    payload = data[pos + HEADER_SIZE : end]
    if zlib.crc32(payload) != crc:
        return _BAD, None
    frame = _parse(payload, pos, end)
    return (_BAD, None) if frame is None else (_OK, frame)


def _resync(data: bytes, pos: int, final: bool) -> int | None:
    """Where reading can go on after damage at ``pos - 1``: the next good frame; unless
    ``final``, also a frame that may be good once more is read, or the last bytes (a magic may
    straddle the end of what was read). None: no good frame follows in final data."""
    while True:
        found = data.find(MAGIC, pos)
        if found < 0:
            return None if final else max(pos, len(data) - len(MAGIC) + 1)
        status, _ = _frame_at(data, found)
        if status == _OK or (status == _SHORT and not final):
            return found
        pos = found + 1


def _count(out: Decoded, kind: str, data: bytes, start: int, end: int) -> None:
    # The events: line ends, past the headers when the damage starts with one (their bytes
    # are numbers, and may hold a newline's value).
    lines_from = start
    if data.startswith(MAGIC, start) and end - start >= HEADER_SIZE + _RUNS_LENGTH.size:
        (runs_length,) = _RUNS_LENGTH.unpack_from(data, start + HEADER_SIZE)
        lines_from = start + HEADER_SIZE + _RUNS_LENGTH.size
        if lines_from + runs_length <= end:
            lines_from += runs_length
    events = data.count(b"\n", lines_from, end)
    if kind == "torn":
        out.torn_bytes += end - start
        out.torn_events += events
    else:
        out.damaged_bytes += end - start
        out.damaged_events += events


def _parse(payload: bytes, start: int, end: int) -> Frame | None:
    """A checked payload's runs and lines; None when they do not agree (the checksum passed
    by chance on garbage)."""
    if len(payload) < _RUNS_LENGTH.size:
        return None
    (runs_length,) = _RUNS_LENGTH.unpack_from(payload)
    body_start = _RUNS_LENGTH.size + runs_length
    if body_start > len(payload):
        return None
    try:
        raw = msgpack.unpackb(payload[_RUNS_LENGTH.size : body_start], use_list=False,
                              unicode_errors="surrogateescape")  # fmt: skip
        runs = [(tag, count, nbytes) for tag, count, nbytes in raw]
    except Exception:  # any shape msgpack can hold but a list of triples: not ours
        return None
    total = 0
    for tag, count, nbytes in runs:
        if not isinstance(tag, str) or type(count) is not int or type(nbytes) is not int:
            return None
        if count < 1:
            return None
        total += count
    body = payload[body_start:]
    # splitlines also cuts at a bare CR, which JSON text never holds: if one is there, the
    # count tells, and the exact split (at newlines only) is taken instead.
    lines = body.splitlines(keepends=True)
    if len(lines) != total or (body and body[-1:] != b"\n"):
        lines = [line + b"\n" for line in body.split(b"\n")[:-1]]
        if len(lines) != total or (body and body[-1:] != b"\n"):
            return None
    return Frame(runs, lines, start, end)
