"""Another Fluentd-compatible server over the forward protocol, as Fluentd's out_forward.

A chunk goes to one server, as PackedForward messages (CompressedPackedForward with ``compress =
"gzip"``) of at most MESSAGE_EVENTS events of one tag, each with a ``chunk`` id. With
``require_ack_response`` it is delivered once every message is acknowledged (the messages that
were not are retried); without, once it is written to the connection, which loses what the
server had not read when a connection breaks, as out_forward does.

Servers are chosen as out_forward chooses them: by weight among those up, standbys only when no
other is; a server that fails is down for ``recover_wait`` (out_forward finds that by
heartbeats; here by the failure itself), and the chunk goes to the next server at once. As with
out_forward's default (``keepalive false``), each chunk has its own connection unless
``keepalive``: the TLS and handshake cost is per chunk, not per event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from aggregator.config.model import ForwardDestination
from aggregator.formatting import line_of
from aggregator.forward_client import MESSAGE_EVENTS, Connection, Parcel, destination_peers
from aggregator.sinks.base import DELIVERED, RetryableError, WriteResult

log = logging.getLogger(__name__)

Piece = tuple[list[bytes], Parcel]
"""A message, and the lines it carries."""


class ForwardSink:
    def __init__(self, name: str, settings: ForwardDestination) -> None:
        self._name = name
        self._settings = settings
        self._peers = destination_peers(settings)
        self._down_until = [0.0] * len(self._peers)
        self._idle: list[list[Connection]] = [[] for _ in self._peers]
        self._random = random.Random()

    async def start(self) -> None:
        pass

    async def write(self, lines: list[bytes]) -> WriteResult:
        pieces = self._pieces(lines)
        errors = []
        for index in self._order():
            peer = self._peers[index]
            try:
                await self._send(index, pieces)
                return DELIVERED
            except (OSError, TimeoutError, ValueError) as exc:  # refused, TLS, handshake, acks
                errors.append(f"{peer.address}: {exc or type(exc).__name__}")
                self._fail(index, exc)
            if any(parcel.acked for _, parcel in pieces):  # some made it: retry only the rest
                return WriteResult(retry=[line for piece, parcel in pieces if not parcel.acked
                                          for line in piece])  # fmt: skip
        raise RetryableError("forward_error", "no server took the chunk: " + "; ".join(errors))

    def _pieces(self, lines: list[bytes]) -> list[Piece]:
        gzip, ack = self._settings.compress == "gzip", self._settings.require_ack_response
        pieces: list[Piece] = []
        run: list[bytes] = []
        entries: list[list[object]] = []
        run_tag = None
        for line in lines:
            tag, entry = line_of(line)
            if tag != run_tag or len(run) == MESSAGE_EVENTS:
                if run:
                    assert run_tag is not None
                    pieces.append((run, Parcel.of(run_tag, entries, compressed=gzip, ack=ack)))
                run, entries, run_tag = [], [], tag
            run.append(line)
            entries.append(entry)
        if run:
            assert run_tag is not None
            pieces.append((run, Parcel.of(run_tag, entries, compressed=gzip, ack=ack)))
        return pieces

    def _order(self) -> list[int]:
        """Servers to try, in turn: one by weight among the regular ones up, the other regular
        ones up, the standbys up, then those down (soonest back first): never none."""
        now = time.monotonic()
        servers = self._settings.servers
        up = [i for i in range(len(servers)) if self._down_until[i] <= now]
        regular = [i for i in up if not servers[i].standby and servers[i].weight > 0]
        first = []
        if regular:
            first = self._random.choices(regular, [servers[i].weight for i in regular])
        rest = [i for i in regular if i not in first] + [i for i in up if i not in regular]
        down = sorted((i for i in range(len(servers)) if i not in up),
                      key=lambda i: self._down_until[i])  # fmt: skip
        return first + rest + down

    async def _send(self, index: int, pieces: list[Piece]) -> None:
        settings = self._settings
        connection = self._idle_connection(index) or await Connection.open(self._peers[index])
        try:
            async with asyncio.timeout(settings.send_timeout):
                for _, parcel in pieces:
                    if not parcel.acked:
                        connection.write(parcel.payload)
                        await connection.drain()
            if settings.require_ack_response:
                async with asyncio.timeout(settings.ack_response_timeout):
                    await _acks(connection, pieces)
        except BaseException:
            connection.abort()
            raise
        if settings.keepalive:
            self._idle[index].append(connection)
        else:
            await connection.close()
        self._down_until[index] = 0.0

    def _idle_connection(self, index: int) -> Connection | None:
        while self._idle[index]:
            connection = self._idle[index].pop()
            if connection.usable:
                return connection
            connection.abort()  # the server closed it while it was idle
        return None

    def _fail(self, index: int, exc: BaseException) -> None:
        peer = self._peers[index]
        was_up = self._down_until[index] <= time.monotonic()
        self._down_until[index] = time.monotonic() + self._settings.recover_wait
        if was_up:
            log.warning(
                "forward server failed: trying the others",
                extra={"destination": self._name, "server": peer.address, "error": str(exc),
                       "recover_wait_s": self._settings.recover_wait},
            )  # fmt: skip

    async def close(self) -> None:
        for connections in self._idle:
            for connection in connections:
                await connection.close()
            connections.clear()


async def _acks(connection: Connection, pieces: list[Piece]) -> None:
    waiting = {parcel.chunk: parcel for _, parcel in pieces if not parcel.acked}
    while waiting:
        reply = await connection.reply()
        chunk = reply.get("ack") if isinstance(reply, dict) else None
        parcel = waiting.pop(chunk, None) if isinstance(chunk, str) else None
        if parcel is None:
            raise ValueError(f"unexpected reply from the server: {reply!r:.100}")
        parcel.acked = True
