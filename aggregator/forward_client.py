"""The forward protocol's client side, as Fluentd's out_forward speaks it: a connection with TLS
and the ``<security>`` handshake when the server asks for them, messages out, replies (acks)
in. The forward destination (``sinks/forward.py``) and the hand-off (``handoff.py``) both send
through it, so both reach any server the other can: Fluentd, Fluent Bit, and this service's
own forward source however it is locked down.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from aggregator.config.model import (
    Config,
    ForwardClientSecurity,
    ForwardDestination,
    ForwardPeer,
    ForwardSource,
)
from aggregator.protocol import encode_packed_forward, new_chunk_id
from aggregator.protocol.handshake import ClientHandshake
from aggregator.tls import client_context, trusting

READ_SIZE = 65536
MESSAGE_EVENTS = 1000
"""Events per forward message: small enough that one refused message costs little to resend,
large enough that gzip and the per-message round trip pay off."""


@dataclass(slots=True)
class Parcel:
    """One forward message (PackedForward, gzip-compressed unless told otherwise) with its
    ``chunk`` id, and whether the server acknowledged it."""

    count: int
    payload: bytes
    chunk: str
    acked: bool = False
    on_ack: Callable[[], None] | None = None

    @classmethod
    def of(
        cls, tag: str, entries: Sequence[Sequence[Any]], on_ack: Callable[[], None] | None = None,
        compressed: bool = True, ack: bool = True,
    ) -> Parcel:  # fmt: skip
        """``ack``: ask for one (a ``chunk`` id); else the server sends nothing back."""
        chunk = new_chunk_id() if ack else ""
        payload = encode_packed_forward(tag, entries, chunk=chunk or None, compressed=compressed)
        return cls(len(entries), payload, chunk, on_ack=on_ack)


@dataclass(frozen=True, slots=True)
class Peer:
    """Where to connect and how: one server, with what it asks of its clients."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    security: ForwardClientSecurity | None = None
    connect_timeout: float = 10.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def destination_peers(settings: ForwardDestination) -> list[Peer]:
    """A forward destination's servers, each with its own key and user over the common ones."""
    tls = client_context(settings.tls) if settings.tls is not None else None
    return [_peer(server, settings, tls) for server in settings.servers]


def _peer(server: ForwardPeer, settings: ForwardDestination, tls: ssl.SSLContext | None) -> Peer:
    security = settings.security
    if security is not None:
        security = security.model_copy(update={
            "shared_key": server.shared_key or security.shared_key,
            "username": server.username or security.username,
            "password": server.password or security.password,
        })  # fmt: skip
    hostname = settings.tls.server_hostname if settings.tls is not None else None
    return Peer(server.host, server.port, tls, hostname or server.host, security,
                settings.connect_timeout)  # fmt: skip


def handoff_peer(config: Config) -> Peer | None:
    """``[server] handoff`` as a peer. Unset handoff_security and handoff_tls default to what
    the forward source on the hand-off's port asks (else the first forward source's): the
    hand-off goes to this same service, behind its load balancer."""
    server = config.server
    address = server.handoff_address
    if address is None:
        return None
    host, port = address
    forwards = [s for s in config.sources if isinstance(s, ForwardSource)]
    target = next((s for s in forwards if s.port == port), forwards[0] if forwards else None)
    security, tls = server.handoff_security, server.handoff_tls
    if security is None and target is not None and target.security is not None:
        source = target.security
        user = source.users[0] if source.user_auth and source.users else None
        security = ForwardClientSecurity(
            # not the server's own name: out_forward refuses a server of its own name (a loop)
            self_hostname=f"handoff@{socket.gethostname()}",
            shared_key=source.shared_key,
            username=user.username if user else "",
            password=user.password if user else "",
        )
    if tls is None and target is not None and target.tls is not None:
        tls = trusting(target.tls)
    context = client_context(tls) if tls is not None else None
    hostname = tls.server_hostname if tls is not None else None
    return Peer(host, port, context, hostname or host, security)


class Connection:
    """One open connection, past TLS and the handshake: ``write`` messages, ``reply`` reads
    the server's next reply (an ack)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self.writer = writer
        self._replies = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")

    @classmethod
    async def open(cls, peer: Peer) -> Connection:
        """Raises OSError (refused, reset, TLS: ssl.SSLError), TimeoutError, or ValueError
        (HandshakeError: the server refused us or is not what it claims)."""
        async with asyncio.timeout(peer.connect_timeout):
            reader, writer = await asyncio.open_connection(
                peer.host, peer.port, ssl=peer.tls,
                server_hostname=peer.server_hostname if peer.tls is not None else None,
            )  # fmt: skip
            connection = cls(reader, writer)
            try:
                if peer.security is not None:
                    await connection._shake_hands(peer.security)
            except BaseException:
                connection.abort()
                raise
        return connection

    async def _shake_hands(self, security: ForwardClientSecurity) -> None:
        handshake = ClientHandshake(security.self_hostname, security.shared_key,
                                    security.username, security.password)  # fmt: skip
        self.writer.write(handshake.ping(await self.reply()))
        handshake.check_pong(await self.reply())

    async def reply(self) -> Any:
        """The server's next message; ConnectionResetError when it closes first."""
        while True:
            try:
                return next(self._replies)
            except StopIteration:
                pass
            data = await self._reader.read(READ_SIZE)
            if not data:
                raise ConnectionResetError("the server closed the connection")
            self._replies.feed(data)

    @property
    def usable(self) -> bool:
        """Not closed, by us or by the server (its FIN arrives whether we read or not)."""
        return not self._reader.at_eof() and not self.writer.transport.is_closing()

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def abort(self) -> None:
        """Close at once, without waiting for what is unsent (the connection is given up)."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()
