from __future__ import annotations

import base64
from itertools import pairwise

import orjson
from hypothesis import given
from hypothesis import strategies as st

from aggregator.config.model import FIREHOSE_MAX_RECORD_BYTES
from aggregator.sinks.firehose.record import Records, build_records
from aggregator.sinks.firehose.request_builder import (
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    Batch,
    build_batches,
)

KIB = 1024
MIB = 1024 * KIB


def record(size: int, tag: int = 0) -> bytes:
    return (b"%08d" % tag + b"x" * size)[:size]


def data(batches: list[Batch]) -> list[bytes]:
    return [x for b in batches for x in b.records.data]


def test_firehose_limits() -> None:
    assert MAX_BATCH_RECORDS == 500
    assert MAX_BATCH_BYTES == 4 * MIB
    assert FIREHOSE_MAX_RECORD_BYTES == 1_000 * KIB


def test_no_records_no_batches() -> None:
    assert build_batches(Records()) == []


def test_at_most_500_records_per_batch() -> None:
    records = [record(10, i) for i in range(1201)]
    batches = build_batches(Records(records))
    assert [len(b.records) for b in batches] == [500, 500, 201]
    assert data(batches) == records


def test_exactly_500_records_is_one_batch() -> None:
    assert len(build_batches(Records([record(10, i) for i in range(500)]))) == 1


def test_at_most_4_mib_per_batch() -> None:
    # Four records of the largest size fit (4,000 KiB <= 4,096 KiB); a fifth does not.
    records = [record(FIREHOSE_MAX_RECORD_BYTES, i) for i in range(9)]
    batches = build_batches(Records(records))
    assert [len(b.records) for b in batches] == [4, 4, 1]
    assert all(b.size <= MAX_BATCH_BYTES for b in batches)


def test_exactly_4_mib_fits_and_one_byte_more_does_not() -> None:
    exact = [record(MIB, i) for i in range(4)]
    assert len(build_batches(Records(exact))) == 1
    over = [*exact[:3], record(MIB + 1, 3)]
    assert [len(b.records) for b in build_batches(Records(over))] == [3, 1]


def test_a_record_larger_than_a_batch_goes_alone() -> None:
    records = [record(10, 0), record(5 * MIB, 1), record(10, 2)]
    assert [len(b.records) for b in build_batches(Records(records))] == [1, 1, 1]


def test_body_is_put_record_batch_json_and_lines_map_back() -> None:
    lines = [b"%03d\n" % i for i in range(10)]
    built = build_records(lines, aggregate=True, record_max_size=12)
    (batch,) = build_batches(built.records)
    body = orjson.loads(batch.body('stream "quoted"'))
    assert body["DeliveryStreamName"] == 'stream "quoted"'
    assert [base64.b64decode(r["Data"]) for r in body["Records"]] == [
        b"000\n001\n002\n",
        b"003\n004\n005\n",
        b"006\n007\n008\n",
        b"009\n",
    ]
    assert list(body["Records"][0]) == ["Data"]
    assert batch.lines() == lines
    assert batch.size == sum(map(len, lines))


def test_a_full_chunk_of_small_events_aggregated_makes_few_calls() -> None:
    lines = [b'{"message":"%05d"}\n' % i for i in range(50_000)]  # 19 bytes each, ~0.9 MiB
    built = build_records(lines, aggregate=True, record_max_size=FIREHOSE_MAX_RECORD_BYTES)
    batches = build_batches(built.records)
    assert len(batches) == 1 and len(batches[0].records) == 1
    unaggregated = build_records(lines, aggregate=False, record_max_size=FIREHOSE_MAX_RECORD_BYTES)
    assert len(build_batches(unaggregated.records)) == 100


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=3000), max_size=300),
    max_records=st.integers(min_value=1, max_value=50),
    max_bytes=st.integers(min_value=1, max_value=10_000),
)
def test_batches_keep_order_and_respect_limits(
    sizes: list[int], max_records: int, max_bytes: int
) -> None:
    records = [record(n, i) for i, n in enumerate(sizes)]
    batches = build_batches(Records(records), max_records=max_records, max_bytes=max_bytes)
    assert data(batches) == records
    for b in batches:
        assert 1 <= len(b.records) <= max_records
        assert b.size == sum(map(len, b.records.data))
        assert b.size <= max_bytes or len(b.records) == 1
        assert b.lines() == b.records.data
    # Greedy: a batch is closed only when the next record would break a limit.
    for b, following in pairwise(batches):
        first = following.records.data[0]
        assert len(b.records) == max_records or b.size + len(first) > max_bytes
