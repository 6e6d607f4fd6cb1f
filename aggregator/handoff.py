"""The hand-off: at stop, events that cannot be delivered in time go to the tasks still running.

A stopping worker sends them to ``[server] handoff`` (on ECS, the service's own load balancer)
with the forward protocol, as Fluentd's out_forward would: CompressedPackedForward messages,
tags kept, each with a ``chunk`` id, and an event counts as handed off only once its message is
acknowledged. Messages are built as they are sent, at most :data:`MAX_UNACKED` ahead of their
acks, so a large buffer (a file buffer's backlog) is handed off in bounded memory. A connection
that fails is replaced and the unacknowledged messages are sent again (with the same chunk ids)
until the time is up; what is still unacknowledged then stays with the caller. Our own
listeners are closed by then, so the load balancer cannot bring the events back to this task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from aggregator.protocol import encode_packed_forward, new_chunk_id

log = logging.getLogger(__name__)

MESSAGE_EVENTS = 1000
"""Events per forward message: small enough that one refused message costs little to resend,
large enough that gzip and the per-message round trip pay off."""
MAX_UNACKED = 64
"""Messages sent and not yet acknowledged, at most (about MESSAGE_EVENTS events each)."""
RECONNECT_DELAY = 0.2
"""Seconds between two connection attempts to the hand-off address."""


@dataclass(slots=True)
class Parcel:
    """One forward message of the hand-off."""

    count: int
    payload: bytes
    chunk: str
    acked: bool = False
    on_ack: Callable[[], None] | None = None

    @classmethod
    def of(
        cls, tag: str, entries: Sequence[Sequence[Any]], on_ack: Callable[[], None] | None = None
    ) -> Parcel:
        chunk = new_chunk_id()
        payload = encode_packed_forward(tag, entries, chunk=chunk, compressed=True)
        return cls(len(entries), payload, chunk, on_ack=on_ack)


class _Flow:
    """The parcels in flight: pulled from the source as acks make room."""

    def __init__(self, parcels: Iterable[Parcel]) -> None:
        self._source: Iterator[Parcel] = iter(parcels)
        self.unacked: dict[str, Parcel] = {}  # in the order sent
        self.exhausted = False
        self.room = asyncio.Event()
        self.acked = 0

    @property
    def done(self) -> bool:
        return self.exhausted and not self.unacked

    def next(self) -> Parcel | None:
        """The next parcel to send, unless MAX_UNACKED are in flight or none is left."""
        if self.exhausted or len(self.unacked) >= MAX_UNACKED:
            return None
        parcel = next(self._source, None)
        if parcel is None:
            self.exhausted = True
            return None
        self.unacked[parcel.chunk] = parcel
        return parcel

    def ack(self, chunk: object) -> None:
        parcel = self.unacked.pop(chunk, None) if isinstance(chunk, str) else None
        if parcel is None:
            raise ValueError(f"unexpected ack from the hand-off peer: {chunk!r:.100}")
        parcel.acked = True
        self.acked += parcel.count
        if parcel.on_ack is not None:
            parcel.on_ack()
        self.room.set()


async def hand_off(address: tuple[str, int], parcels: Iterable[Parcel], until: float) -> None:
    """Send the parcels ``parcels`` yields to ``address`` until each is acknowledged
    (``Parcel.acked``, and its ``on_ack``) or the monotonic time ``until`` passes."""
    host, port = address
    flow = _Flow(parcels)
    tries = 0
    while not flow.done and time.monotonic() < until:
        tries += 1
        try:
            async with asyncio.timeout(until - time.monotonic()):
                await _send(host, port, flow)
        except TimeoutError:
            break
        except (OSError, ValueError) as exc:  # refused, reset, or a reply that is not an ack
            log.warning(
                "hand-off connection failed; trying again",
                extra={"address": f"{host}:{port}", "error": str(exc), "attempt": tries},
            )
            await asyncio.sleep(max(0.0, min(RECONNECT_DELAY, until - time.monotonic())))
    if not flow.done:
        log.error(
            "hand-off incomplete",
            extra={"address": f"{host}:{port}", "handed_off": flow.acked,
                   "unacknowledged": sum(p.count for p in flow.unacked.values()),
                   "all_sent": flow.exhausted},
        )  # fmt: skip
    elif flow.acked:
        log.info("handed off", extra={"address": f"{host}:{port}", "events": flow.acked})


async def _send(host: str, port: int, flow: _Flow) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    loop = asyncio.get_running_loop()
    acks = loop.create_task(_read_acks(reader, flow))
    try:
        for parcel in list(flow.unacked.values()):  # what the last connection left unacked
            writer.write(parcel.payload)
            await writer.drain()
        while not flow.done and not acks.done():
            sent = flow.next()
            if sent is not None:
                writer.write(sent.payload)
                await writer.drain()
                continue
            if flow.done:
                break
            flow.room.clear()  # MAX_UNACKED in flight: wait for an ack (or the end)
            room = loop.create_task(flow.room.wait())
            await asyncio.wait({acks, room}, return_when=asyncio.FIRST_COMPLETED)
            room.cancel()
        if acks.done():
            acks.result()  # the peer went away: its error
    finally:
        acks.cancel()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_acks(reader: asyncio.StreamReader, flow: _Flow) -> None:
    unpacker = msgpack.Unpacker(raw=False)
    while not flow.done:
        data = await reader.read(65536)
        if not data:
            raise ConnectionResetError(
                f"closed with {len(flow.unacked)} messages unacknowledged"
            )
        unpacker.feed(data)
        for reply in unpacker:
            flow.ack(reply.get("ack") if isinstance(reply, dict) else reply)
