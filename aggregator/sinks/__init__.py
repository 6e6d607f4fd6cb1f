"""Sinks: where a destination's chunks go. See base.py for the contract with the buffer."""

from __future__ import annotations

from aggregator.config.model import (
    Destination,
    FileDestination,
    FirehoseDestination,
    ForwardDestination,
    NullDestination,
    StdoutDestination,
)
from aggregator.sinks.base import Sink


def build_sink(name: str, settings: Destination, worker: int = 0) -> Sink:
    """The sink for one destination of one worker."""
    if isinstance(settings, FirehoseDestination):
        from aggregator.sinks.firehose import FirehoseSink  # keeps botocore off the import path

        return FirehoseSink(name, settings)
    if isinstance(settings, FileDestination):
        from aggregator.sinks.file import FileSink

        return FileSink(settings, worker)
    if isinstance(settings, StdoutDestination):
        from aggregator.sinks.stdout import StdoutSink

        return StdoutSink()
    if isinstance(settings, ForwardDestination):
        from aggregator.sinks.forward import ForwardSink

        return ForwardSink(name, settings)
    if isinstance(settings, NullDestination):
        from aggregator.sinks.null import NullSink

        return NullSink()
    raise TypeError(f"no sink for {type(settings).__name__}")
