"""The Firehose sink: a chunk's lines → records → batches → concurrent calls → one result."""

from __future__ import annotations

import asyncio

from aggregator.config.model import FirehoseDestination
from aggregator.sinks.base import DELIVERED, RetryableError, WriteResult
from aggregator.sinks.firehose.record import build_records, shaper
from aggregator.sinks.firehose.request_builder import Batch, build_batches
from aggregator.sinks.firehose.service import FirehoseService

RECORD_TOO_LARGE = "record_too_large"
DATA_KEY_MISSING = "data_key_missing"


class FirehoseSink:
    """Delivers chunks to one Firehose delivery stream (the :class:`~aggregator.sinks.base.Sink`
    protocol): one attempt per :meth:`write`, every batch of the chunk sent at once."""

    def __init__(self, name: str, settings: FirehoseDestination) -> None:
        self.name = name
        self._aggregate = settings.aggregate
        self._record_max_size = settings.record_max_size
        self._shape = shaper(settings.data_key, settings.compression, settings.chomp_record)
        self._service = FirehoseService(name, settings)

    async def start(self) -> None:
        await self._service.start()

    async def close(self) -> None:
        await self._service.close()

    async def write(self, lines: list[bytes]) -> WriteResult:
        built = build_records(lines, aggregate=self._aggregate,
                              record_max_size=self._record_max_size, shape=self._shape)  # fmt: skip
        batches = build_batches(built.records)
        unsendable = {RECORD_TOO_LARGE: built.oversize, DATA_KEY_MISSING: built.keyless}
        if len(batches) == 1 and not built.oversize and not built.keyless:
            return await self._service.put_batch(batches[0])  # the common case, kept direct
        outcomes = await asyncio.gather(
            *(self._service.put_batch(batch) for batch in batches), return_exceptions=True
        )
        return _merge(batches, outcomes, {k: v for k, v in unsendable.items() if v})


def _merge(
    batches: list[Batch], outcomes: list[WriteResult | BaseException],
    unsendable: dict[str, list[bytes]],
) -> WriteResult:  # fmt: skip
    """One result for the chunk (``unsendable``: lines never sent, by reason). Raise only when
    nothing was settled: as soon as a batch went through (or lines were rejected), failed
    batches become ``retry`` so the buffer never resends what was delivered."""
    failures: list[tuple[Batch, RetryableError]] = []
    for batch, outcome in zip(batches, outcomes, strict=True):
        if isinstance(outcome, RetryableError):
            failures.append((batch, outcome))
        elif isinstance(outcome, BaseException):
            raise outcome  # a bug, not a delivery outcome: let it surface
    if failures and len(failures) == len(batches) and not unsendable:
        # A new error, not the gathered one: raised again, that one's traceback would hold
        # this frame, which holds it (a cycle keeping every batch's request body alive until a
        # full collection: 1.2 GB for a 256 MiB buffer in an outage of 503s).
        first = failures[0][1]
        raise RetryableError(first.reason, str(first)) from None
    if not failures and not unsendable and all(o is DELIVERED for o in outcomes):
        return DELIVERED
    result = WriteResult()
    for reason, lines in unsendable.items():
        result.reject(reason, lines)
    for batch, outcome in zip(batches, outcomes, strict=True):
        if isinstance(outcome, RetryableError):
            result.retry.extend(batch.lines())
        elif isinstance(outcome, WriteResult):
            result.retry.extend(outcome.retry)
            for reason, rejected in outcome.rejected.items():
                result.reject(reason, rejected)
    return result
