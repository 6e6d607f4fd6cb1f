"""Helpers shared by the Firehose sink tests."""

from __future__ import annotations

from typing import Any

from aggregator.config.model import FirehoseDestination


def firehose_settings(
    endpoint_url: str, stream: str = "events", **extra: Any
) -> FirehoseDestination:
    return FirehoseDestination.model_validate(
        {
            "type": "firehose",
            "delivery_stream": stream,
            "endpoint_url": endpoint_url,
            "region": "us-east-1",
            **extra,
        }
    )
