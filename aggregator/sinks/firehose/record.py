"""Lines of a chunk → Firehose records, each remembering the lines it carries.

Pure and allocation-light: the aggregating path does integer arithmetic per line and one
``b"".join`` per record, because this runs for every event the aggregator delivers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, NamedTuple


class Record(NamedTuple):
    """One Firehose record: its payload and the chunk lines it was built from.

    ``lines`` is kept so that a record Firehose refuses maps back to exactly its events, which
    go back to the buffer for another attempt.
    """

    data: bytes
    lines: Sequence[bytes]


_new_record: Any = tuple.__new__


@dataclass(slots=True)
class RecordSet:
    """The records built from one chunk, and the lines that cannot be sent at all."""

    records: list[Record] = field(default_factory=list)
    oversize: list[bytes] = field(default_factory=list)
    """Lines longer than the record size limit, in their original order: Firehose would refuse
    them, so they are never sent (the sink rejects them as ``record_too_large``)."""


def build_records(lines: list[bytes], *, aggregate: bool, record_max_size: int) -> RecordSet:
    """Build records from ``lines`` (each one event ending in a newline), keeping their order.

    ``aggregate=False``: one line per record, as OpenSearch-bound streams need.
    ``aggregate=True``: consecutive lines concatenated into records of at most
    ``record_max_size`` bytes; since every line ends in a newline, the record is
    newline-delimited and S3 objects come out as NDJSON.
    """
    if aggregate:
        return _aggregated(lines, record_max_size)
    return _one_per_line(lines, record_max_size)


def _one_per_line(lines: list[bytes], limit: int) -> RecordSet:
    # The common case (no oversize line) builds every (line, (line,)) record in C:
    # NamedTuple's own constructor is a Python function, too slow to call once per event.
    if max(map(len, lines), default=0) <= limit:
        pairs = zip(lines, zip(lines, strict=True), strict=True)
        return RecordSet(list(map(_new_record, repeat(Record), pairs)))
    out = RecordSet()
    for line in lines:
        if len(line) > limit:
            out.oversize.append(line)
        else:
            out.records.append(Record(line, (line,)))
    return out


def _aggregated(lines: list[bytes], limit: int) -> RecordSet:
    out = RecordSet()
    records = out.records
    start = 0  # first line of the record being packed
    size = 0  # its bytes so far
    for i, line in enumerate(lines):
        n = len(line)
        if size + n <= limit:
            size += n
            continue
        if start < i:
            packed = lines[start:i]
            records.append(Record(b"".join(packed), packed))
        if n > limit:
            # An oversize line ends the current record without joining any: records stay
            # contiguous runs of lines, which keeps the mapping back to lines a slice.
            out.oversize.append(line)
            start, size = i + 1, 0
        else:
            start, size = i, n
    if start < len(lines):
        packed = lines[start:]
        records.append(Record(b"".join(packed), packed))
    return out
