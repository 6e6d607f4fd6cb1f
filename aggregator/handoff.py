"""The hand-off: at stop, events that cannot be delivered in time go to the tasks still running.

A stopping worker sends them to ``[server] handoff`` (on ECS, the service's own load balancer)
with the forward protocol, as Fluentd's out_forward would: CompressedPackedForward messages,
tags kept, each with a ``chunk`` id, and an event counts as handed off only once its message is
acknowledged. A connection that fails is replaced and the unacknowledged messages are sent again
(with the same chunk ids) until the time is up; what is still unacknowledged then goes back to
the caller, which hands it to the secondary. Our own listeners are closed by then, so the load
balancer cannot bring the events back to this task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from aggregator.protocol import encode_packed_forward, new_chunk_id

log = logging.getLogger(__name__)

MESSAGE_EVENTS = 1000
"""Events per forward message: small enough that one refused message costs little to resend,
large enough that gzip and the per-message round trip pay off."""
RECONNECT_DELAY = 0.2
"""Seconds between two connection attempts to the hand-off address."""


@dataclass(slots=True)
class Parcel:
    """One forward message of the hand-off."""

    count: int
    payload: bytes
    chunk: str
    acked: bool = False

    @classmethod
    def of(cls, tag: str, entries: Sequence[Sequence[Any]]) -> Parcel:
        chunk = new_chunk_id()
        payload = encode_packed_forward(tag, entries, chunk=chunk, compressed=True)
        return cls(len(entries), payload, chunk)


async def hand_off(address: tuple[str, int], parcels: Sequence[Parcel], until: float) -> None:
    """Send ``parcels`` to ``address`` until each is acknowledged (``Parcel.acked``) or the
    monotonic time ``until`` passes."""
    host, port = address
    tries = 0
    while (pending := [p for p in parcels if not p.acked]) and time.monotonic() < until:
        tries += 1
        try:
            async with asyncio.timeout(until - time.monotonic()):
                await _send(host, port, pending)
        except TimeoutError:
            break
        except (OSError, ValueError) as exc:  # refused, reset, or a reply that is not an ack
            log.warning(
                "hand-off connection failed; trying again",
                extra={"address": f"{host}:{port}", "error": str(exc), "attempt": tries},
            )
            await asyncio.sleep(max(0.0, min(RECONNECT_DELAY, until - time.monotonic())))
    acked = sum(p.count for p in parcels if p.acked)
    left = sum(p.count for p in parcels if not p.acked)
    if left:
        log.error(
            "hand-off incomplete",
            extra={"address": f"{host}:{port}", "handed_off": acked, "left": left},
        )
    elif acked:
        log.info("handed off", extra={"address": f"{host}:{port}", "events": acked})


async def _send(host: str, port: int, parcels: list[Parcel]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        acks = asyncio.get_running_loop().create_task(_read_acks(reader, parcels))
        try:
            for parcel in parcels:
                writer.write(parcel.payload)
                await writer.drain()
                if acks.done():
                    break  # the peer went away: its error is below
            await acks
        finally:
            acks.cancel()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_acks(reader: asyncio.StreamReader, parcels: list[Parcel]) -> None:
    waiting = {p.chunk: p for p in parcels}
    unpacker = msgpack.Unpacker(raw=False)
    while waiting:
        data = await reader.read(65536)
        if not data:
            raise ConnectionResetError(f"closed with {len(waiting)} messages unacknowledged")
        unpacker.feed(data)
        for reply in unpacker:
            chunk = reply.get("ack") if isinstance(reply, dict) else None
            parcel = waiting.pop(chunk, None) if isinstance(chunk, str) else None
            if parcel is None:
                raise ValueError(f"unexpected reply from the hand-off peer: {reply!r:.100}")
            parcel.acked = True
