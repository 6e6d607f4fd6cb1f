"""Lines of a chunk → Firehose records, each remembering the lines it carries.

Pure and allocation-light: this runs for every event the aggregator delivers, so one line per
record (the default) builds no object per record at all, and aggregation does integer
arithmetic per line and one ``b"".join`` per record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class Records:
    """Firehose records, in order, and the chunk lines each one carries: a record Firehose
    refuses maps back to exactly its events, which go back to the buffer for another attempt."""

    data: list[bytes] = field(default_factory=list)
    """Each record's payload."""
    packed: list[Sequence[bytes]] | None = None
    """With aggregation, the lines packed into each record. None: every record is one line and
    its own payload (no per-record object: a tuple per event cost 5 % of a worker's time in
    PackedForward mode)."""
    sizes: list[int] | None = None
    """Each payload's length, when it is known already: a pass over thousands of lines that
    have left the CPU's cache since they were buffered is not free."""

    def __len__(self) -> int:
        return len(self.data)

    def lines_of(self, i: int) -> Sequence[bytes]:
        """The lines record ``i`` carries."""
        return (self.data[i],) if self.packed is None else self.packed[i]

    def lines(self) -> list[bytes]:
        """Every line the records carry, in order."""
        if self.packed is None:
            return list(self.data)
        return [line for lines in self.packed for line in lines]

    def part(self, start: int, stop: int) -> Records:
        """Records ``start`` to ``stop`` (excluded)."""
        packed = None if self.packed is None else self.packed[start:stop]
        sizes = None if self.sizes is None else self.sizes[start:stop]
        return Records(self.data[start:stop], packed, sizes)


@dataclass(slots=True)
class RecordSet:
    """The records built from one chunk, and the lines that cannot be sent at all."""

    records: Records = field(default_factory=Records)
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
    sizes = list(map(len, lines))
    if max(sizes, default=0) <= record_max_size:  # the common case: the lines as they are
        return RecordSet(Records(lines, sizes=sizes))
    out = RecordSet()
    for line in lines:
        (out.oversize if len(line) > record_max_size else out.records.data).append(line)
    return out


def _aggregated(lines: list[bytes], limit: int) -> RecordSet:
    data: list[bytes] = []
    packed: list[Sequence[bytes]] = []
    out = RecordSet(Records(data, packed))
    start = 0  # first line of the record being packed
    size = 0  # its bytes so far
    for i, line in enumerate(lines):
        n = len(line)
        if size + n <= limit:
            size += n
            continue
        if start < i:
            packed.append(lines[start:i])
            data.append(b"".join(packed[-1]))
        if n > limit:
            # An oversize line ends the current record without joining any: records stay
            # contiguous runs of lines, which keeps the mapping back to lines a slice.
            out.oversize.append(line)
            start, size = i + 1, 0
        else:
            start, size = i, n
    if start < len(lines):
        packed.append(lines[start:])
        data.append(b"".join(packed[-1]))
    return out
