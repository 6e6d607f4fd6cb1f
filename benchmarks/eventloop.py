"""The event loop of the harness's own processes (sink, senders): uvloop when installed, as the
aggregator's, so that the harness spends less CPU than what it measures."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # optional: only cheaper
        asyncio.run(main)
    else:
        uvloop.run(main)
