"""The hand-off: at stop, events that cannot be delivered in time go to the tasks still running.

A stopping worker sends them to ``[server] handoff`` (on ECS, the service's own load balancer)
through the forward client (TLS and the handshake when the port asks for them, as the forward
source there does by default), as Fluentd's out_forward would: CompressedPackedForward messages,
tags kept, each with a ``chunk`` id, and an event counts as handed off only once its message is
acknowledged. Messages are built as they are sent, at most :data:`MAX_UNACKED` ahead of their
acks, so a large buffer (a file buffer's backlog) is handed off in bounded memory. A connection
that fails is replaced and the unacknowledged messages are sent again (with the same chunk ids)
until the time is up; what is still unacknowledged then stays with the caller. Our own
listeners are closed by then, so the load balancer cannot bring the events back to this task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator

from aggregator.forward_client import Connection, Parcel, Peer

log = logging.getLogger(__name__)

MAX_UNACKED = 64
"""Messages sent and not yet acknowledged, at most (MESSAGE_EVENTS events each, at most)."""
RECONNECT_DELAY = 0.2
"""Seconds between two connection attempts to the hand-off address."""


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


async def hand_off(peer: Peer, parcels: Iterable[Parcel], until: float) -> None:
    """Send the parcels ``parcels`` yields to ``peer`` until each is acknowledged
    (``Parcel.acked``, and its ``on_ack``) or the monotonic time ``until`` passes."""
    flow = _Flow(parcels)
    tries = 0
    while not flow.done and time.monotonic() < until:
        tries += 1
        try:
            async with asyncio.timeout(until - time.monotonic()):
                await _send(peer, flow)
        except TimeoutError:
            break
        except (OSError, ValueError) as exc:  # refused, reset, TLS, handshake, not an ack
            log.warning(
                "hand-off connection failed; trying again",
                extra={"address": peer.address, "error": str(exc), "attempt": tries},
            )
            await asyncio.sleep(max(0.0, min(RECONNECT_DELAY, until - time.monotonic())))
    if not flow.done:
        log.error(
            "hand-off incomplete",
            extra={"address": peer.address, "handed_off": flow.acked,
                   "unacknowledged": sum(p.count for p in flow.unacked.values()),
                   "all_sent": flow.exhausted},
        )  # fmt: skip
    elif flow.acked:
        log.info("handed off", extra={"address": peer.address, "events": flow.acked})


async def _send(peer: Peer, flow: _Flow) -> None:
    connection = await Connection.open(peer)
    loop = asyncio.get_running_loop()
    acks = loop.create_task(_read_acks(connection, flow))
    try:
        for parcel in list(flow.unacked.values()):  # what the last connection left unacked
            connection.write(parcel.payload)
            await connection.drain()
        while not flow.done and not acks.done():
            sent = flow.next()
            if sent is not None:
                connection.write(sent.payload)
                await connection.drain()
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
        await connection.close()


async def _read_acks(connection: Connection, flow: _Flow) -> None:
    while not flow.done:
        try:
            reply = await connection.reply()
        except ConnectionResetError:
            raise ConnectionResetError(
                f"closed with {len(flow.unacked)} messages unacknowledged"
            ) from None
        flow.ack(reply.get("ack") if isinstance(reply, dict) else reply)
