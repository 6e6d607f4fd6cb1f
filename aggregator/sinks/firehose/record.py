"""Lines of a chunk → Firehose records, each remembering the lines it carries.

Pure and allocation-light: this runs for every event the aggregator delivers, so one line per
record (the default) builds no object per record at all, and aggregation does integer
arithmetic per line and one ``b"".join`` per record.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import orjson

from aggregator.protocol.encoder import GZIP_LEVEL
from aggregator.ruby import to_s


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
    keyless: list[bytes] = field(default_factory=list)
    """Lines without the ``data_key`` field: nothing to send (rejected as
    ``data_key_missing``)."""


Shape = Callable[[bytes], bytes | None]
"""A line → the record's data (None: the line has none to send)."""


def shaper(data_key: str | None, compression: str | None, chomp_record: bool) -> Shape | None:
    """What the Kinesis plugin makes of an event, when it is more than its JSON line: only the
    ``data_key`` field's text (Ruby's to_s), or the line without its newline
    (``chomp_record``), then gzip or zlib; then, as its ``append_new_line``, a newline (a text
    record loses one it ends with first; a compressed one is left whole, where the plugin's
    chomp would cut a last byte that happens to be a newline). None: the line as it is."""
    if data_key is None and compression is None and not chomp_record:
        return None
    compress: Callable[[bytes], bytes] | None = None
    if compression == "gzip":
        compress = partial(gzip.compress, compresslevel=GZIP_LEVEL, mtime=0)
    elif compression == "zlib":
        compress = zlib.compress

    def shape(line: bytes) -> bytes | None:
        data = line
        if data_key is not None:
            value = orjson.loads(line).get(data_key)
            if value is None:
                return None
            data = to_s(value).encode("utf-8", "surrogateescape")
        elif chomp_record:
            data = line[:-1]
        if compress is not None:
            return compress(data) + b"\n"
        return _chomp(data) + b"\n"

    return shape


def _chomp(data: bytes) -> bytes:
    """Ruby's String#chomp: one line ending off the end."""
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith((b"\n", b"\r")) else data


def build_records(
    lines: list[bytes], *, aggregate: bool, record_max_size: int, shape: Shape | None = None
) -> RecordSet:
    """Build records from ``lines`` (each one event ending in a newline), keeping their order.

    ``aggregate=False``: one line per record, as OpenSearch-bound streams need.
    ``aggregate=True``: consecutive lines concatenated into records of at most
    ``record_max_size`` bytes; since every line ends in a newline, the record is
    newline-delimited and S3 objects come out as NDJSON.
    ``shape``: each record's data made from its line (see :func:`shaper`).
    """
    if shape is not None:
        return _shaped(lines, shape, aggregate, record_max_size)
    if aggregate:
        return _aggregated(lines, lines, record_max_size, RecordSet())
    sizes = list(map(len, lines))
    if max(sizes, default=0) <= record_max_size:  # the common case: the lines as they are
        return RecordSet(Records(lines, sizes=sizes))
    out = RecordSet()
    for line in lines:
        (out.oversize if len(line) > record_max_size else out.records.data).append(line)
    return out


def _shaped(lines: list[bytes], shape: Shape, aggregate: bool, limit: int) -> RecordSet:
    out = RecordSet()
    kept: list[bytes] = []
    datas: list[bytes] = []
    for line in lines:
        data = shape(line)
        if data is None:
            out.keyless.append(line)
        else:
            kept.append(line)
            datas.append(data)
    if aggregate:
        return _aggregated(kept, datas, limit, out)
    packed: list[Sequence[bytes]] = []
    out.records = Records([], packed)
    for line, data in zip(kept, datas, strict=True):
        if len(data) > limit:
            out.oversize.append(line)
        else:
            out.records.data.append(data)
            packed.append((line,))
    return out


def _aggregated(lines: list[bytes], datas: list[bytes], limit: int, out: RecordSet) -> RecordSet:
    """Consecutive ``datas`` (the records' data of ``lines``, or the lines themselves) joined
    into records of at most ``limit`` bytes."""
    data: list[bytes] = []
    packed: list[Sequence[bytes]] = []
    out.records = Records(data, packed)
    start = 0  # first line of the record being packed
    size = 0  # its bytes so far
    for i, item in enumerate(datas):
        n = len(item)
        if size + n <= limit:
            size += n
            continue
        if start < i:
            packed.append(lines[start:i])
            data.append(b"".join(packed[-1] if datas is lines else datas[start:i]))
        if n > limit:
            # An oversize line ends the current record without joining any: records stay
            # contiguous runs of lines, which keeps the mapping back to lines a slice.
            out.oversize.append(lines[i])
            start, size = i + 1, 0
        else:
            start, size = i, n
    if start < len(lines):
        packed.append(lines[start:])
        data.append(b"".join(packed[-1] if datas is lines else datas[start:]))
    return out
