"""The Fluentd forward input: TCP on 24224 (all four modes, acks) and UDP heartbeats.

One :class:`ForwardConnection` per client, built on ``asyncio.Protocol``: bytes go into the
sans-IO decoder, messages come out and are dispatched one by one. When the answer is to wait (a
destination's buffer is full and blocks, or a tenant over its limits sends alone on this
connection without acks), the connection stops reading (TCP backpressure reaches the sender)
and offers the same message again once the wait is over. Bad input closes that one connection.

Closing a connection ourselves (the stop, ``max_connection_age``) waits for its first safe
moment, because a client that is not reading cannot tell a closed connection from a slow one:

- A client that never asked for acks (Docker's driver by default) is closed with a reset (RST)
  right after a read that left nothing in the socket and no partial message. Its next write
  then fails, and it sends that message again on a new connection. After a plain close (FIN)
  that write would succeed into a dead connection and be lost.
- A client that uses acks gets the acks for everything it sent, then a FIN (a reset could
  destroy an ack in flight and cause a duplicate). What it sends after that is read and
  discarded unacknowledged: it sends it again elsewhere.
- A message split across reads is completed first. ``drain_timeout`` bounds all this; a
  connection with no safe moment by then is reset, and what it leaves is counted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import socket
import ssl
import time
from typing import Any, cast

from aggregator import metrics
from aggregator.admission import Refused, Sender, Wait
from aggregator.config.model import ForwardSource, Server
from aggregator.logs import Throttle
from aggregator.pipeline import Outcome, Pipeline
from aggregator.protocol import Batch, ForwardDecoder, ProtocolError, encode_ack
from aggregator.protocol.handshake import Client, Security, ServerHandshake, User
from aggregator.sources import Listener
from aggregator.sources.connections import ConnectionSet
from aggregator.sources.tcp import reset_if_drained, reset_now, set_keepalive
from aggregator.stores import Commit
from aggregator.tls import server_context

log = logging.getLogger(__name__)

HEARTBEAT_REPLY = b"\x00"
"""What Fluentd's in_forward answers to a UDP heartbeat."""

FAIR_READ_BYTES = 64 * 1024
"""A read at least this big suggests more is waiting: the connection yields the loop."""
BAD_INPUT_WARNING_INTERVAL = 10.0
"""Seconds between two "bad input" log lines of one source; each refusal is counted in
aggregator_input_errors_total (a million bad frames made 71 MB of logs)."""
TRICKLE_RATE = 256 * 1024
"""Bytes per second under which a connection without acks is read only every
``trickle_read_delay``: its lines wait in the socket meanwhile, and one read takes them all
(reading Docker's driver, a write per line, cost a callback, a read and a decode per line).
At that rate the kernel's socket buffer holds a delay's worth many times over, so the sender
never waits for us."""
TRICKLE_WINDOW = 1.0
"""Seconds over which a connection's rate is measured (a new connection is read at once until
its first window ends)."""
ACK_HIGH_WATER = 64 * 1024
"""Unsent acks (about 30 bytes each) above which reading stops: a client that never reads its
acks must not grow our write buffer without bound."""


class FlowControl:
    """Why a connection's reading is paused. Any reason pauses it; it resumes when none is
    left: an answer to wait (a full buffer, a tenant's limit), a yield after a big read, a
    trickle's delay, acks the client does not read.
    """

    __slots__ = ("_reasons", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._reasons: set[str] = set()

    @property
    def paused(self) -> bool:
        return bool(self._reasons)

    def pause(self, reason: str) -> None:
        if not self._reasons:
            self._transport.pause_reading()
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons and not self._transport.is_closing():
            self._transport.resume_reading()


class ForwardConnection(asyncio.Protocol):
    def __init__(self, server: ForwardServer) -> None:
        self._server = server
        self._pipeline = server.pipeline
        self._decoder = ForwardDecoder(
            server.settings.message_length_limit, server.settings.message_entries_limit
        )
        self._transport: asyncio.Transport | None = None
        self._flow: FlowControl | None = None
        self._pending: Batch | None = None  # the batch told to wait
        self._waiting: asyncio.Task[None] | None = None  # held: the loop keeps weak references
        self._sender = Sender()
        self._peer = "?"
        self.last_activity = time.monotonic()
        self.uses_acks = False
        self._closing: str | None = None  # why we are closing: at the first safe moment
        self._discarding = False  # FIN sent after the last ack: the rest is not ours to take
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._handshake: ServerHandshake | None = None  # until the client has authenticated
        self._unwritten = 0  # acks waiting for a file buffer's write
        self._trickle = False  # slow enough to be read every trickle_read_delay
        self._safe_from = 0.0  # closing: no read before this is a safe moment (a trickle)
        self._window_start = self.last_activity
        self._window_bytes = 0
        self._m_events = metrics.tally(metrics.INPUT_EVENTS.labels(server.settings.name))
        self._m_bytes = metrics.tally(metrics.INPUT_BYTES.labels(server.settings.name))

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = self._transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        settings = self._server.settings
        if len(self._server.connections) >= settings.max_connections:
            self._server.refuse_connection(self._peer)
            self._transport.abort()
            self._transport = None
            return
        self._transport.set_write_buffer_limits(high=ACK_HIGH_WATER)
        self._flow = FlowControl(self._transport)
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            set_keepalive(sock, settings)
        security = self._server.security
        if security is not None and settings.security is not None:
            address = peer[0] if isinstance(peer, tuple) else ""
            self._handshake = ServerHandshake(security, address)
            self._transport.write(self._handshake.helo())
            self._later("handshake", settings.security.handshake_timeout, self._refuse,
                        "handshake_timeout", "no handshake in time")  # fmt: skip
        if settings.max_connection_age is not None:
            age = settings.max_connection_age
            age *= 1 - random.random() * settings.max_connection_age_jitter
            self._later("max_age", age, self.begin_close, "max_age")
        self._server.connections.add(self)
        if self._server.stopping:  # taken from the accept queue at the stop
            self.begin_close("stop")

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._transport = None
        if self._waiting is not None:
            self._waiting.cancel()  # a message of a closed connection is offered no more
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def data_received(self, data: bytes) -> None:
        self.last_activity = now = time.monotonic()
        if self._discarding:
            return
        self._window_bytes += len(data)
        if now - self._window_start >= TRICKLE_WINDOW:
            self._trickle = self._window_bytes < TRICKLE_RATE * (now - self._window_start)
            self._window_start, self._window_bytes = now, 0
        self._m_bytes.pending += len(data)
        try:
            self._decoder.receive_data(data)
        except ProtocolError as exc:
            self._refuse(exc.reason, str(exc))
            return
        if self._handshake is not None and not self._shake():
            return
        if self._pending is None:
            self._process()
        if self._decoder.pending_bytes:
            if "message" not in self._timers:  # the first byte of a message: its clock starts
                self._later("message", self._server.settings.message_timeout, self._timed_out)
        elif "message" in self._timers:
            self._cancel("message")
        if self._closing is not None and now >= self._safe_from:
            self._close_if_safe()
        flow = self._flow
        if flow is None or self._transport is None:
            return
        if len(data) >= FAIR_READ_BYTES:
            # libuv keeps reading a busy socket (up to 32 reads) before anything else runs: a
            # few fast senders would starve deliveries and /api/health for seconds. After a
            # big read, step aside until the next loop iteration.
            flow.pause("yield")
            asyncio.get_running_loop().call_soon(flow.resume, "yield")
        elif (self._trickle and not self.uses_acks and self._closing is None
              and not self._decoder.pending_bytes):  # fmt: skip
            # A sender without acks that writes little at a time (Docker's driver, a write per
            # line): let its lines gather in the socket, and take them in one read. Not with
            # acks (the sender waits for each), nor with a message in progress.
            delay = self._server.settings.trickle_read_delay
            if delay:
                flow.pause("trickle")
                self._later("trickle", delay, flow.resume, "trickle")

    def _shake(self) -> bool:
        """Go on with the handshake; True once the client has authenticated."""
        handshake, transport = self._handshake, self._transport
        assert handshake is not None and transport is not None
        if handshake.failed:
            return False  # closing: nothing the client sends now is read
        try:
            raw = self._decoder.next_raw()
        except ProtocolError as exc:
            self._refuse(exc.reason, str(exc))
            return False
        if raw is None:
            return False
        transport.write(handshake.receive(raw[0]))
        if handshake.failed:
            metrics.INPUT_ERRORS.labels(self._server.settings.name, "auth_failed").inc()
            if refused := self._server.auth_warning.hit():
                log.warning(
                    "refusing client: authentication failed",
                    extra={"source": self._server.settings.name, "peer": self._peer,
                           "hostname": handshake.client_hostname, "reason": handshake.failure,
                           "refused_since_last_line": refused},
                )  # fmt: skip
            transport.close()  # after the PONG that says why
            return False
        self._handshake = None
        self._cancel("handshake")
        return True

    def pause_writing(self) -> None:
        assert self._flow is not None
        self._flow.pause("acks")

    def resume_writing(self) -> None:
        assert self._flow is not None
        self._flow.resume("acks")

    def eof_received(self) -> bool | None:
        return None  # close our side too: a client that half-closes is done

    # --- the work ---------------------------------------------------------------------------

    def _process(self) -> None:
        """Dispatch decoded batches until the decoder needs more bytes or an answer is to wait
        (a full buffer that blocks, a tenant's limit): then reading pauses until it is over."""
        transport, flow = self._transport, self._flow
        settings = self._server.settings
        while transport is not None and flow is not None and not transport.is_closing():
            try:
                batch = self._decoder.next_batch()
            except ProtocolError as exc:
                self._refuse(exc.reason, str(exc))
                return
            if batch is None:
                return
            answer = self._pipeline.dispatch(batch.tag, batch.entries, settings.name,
                                             label=settings.label, sender=self._sender,
                                             acks=bool(batch.chunks))  # fmt: skip
            if isinstance(answer, Wait):
                self._pending = batch
                flow.pause("wait")
                self._waiting = asyncio.get_running_loop().create_task(
                    self._offer_again(batch, answer)
                )
                return
            self._settle(batch, answer)

    def _settle(self, batch: Batch, answer: Outcome | Commit | Refused) -> None:
        """A message answered: acknowledge it when it asked (once written, for a file buffer),
        unless it was refused (the client sends it again)."""
        self._m_events.pending += len(batch.entries)
        if batch.chunks and self._transport is not None:
            self.uses_acks = True
            if isinstance(answer, Commit):
                self._ack_once_written(answer, b"".join(map(encode_ack, batch.chunks)))
            elif not isinstance(answer, Refused):
                self._transport.write(b"".join(map(encode_ack, batch.chunks)))

    def _ack_once_written(self, commit: Commit, acks: bytes) -> None:
        """A file buffer acknowledges once the events are written; a write that fails sends no
        ack, and the client sends the message again."""
        self._unwritten += 1

        def written(ok: bool) -> None:
            self._unwritten -= 1
            transport = self._transport
            if transport is None or transport.is_closing():
                return
            if ok:
                transport.write(acks)
            if self._closing is not None:
                self._close_if_safe()

        commit.then(written)

    async def _offer_again(self, batch: Batch, wait: Wait) -> None:
        settings = self._server.settings
        answer = await self._pipeline.offer(wait, batch.tag, batch.entries, settings.name,
                                            label=settings.label, sender=self._sender,
                                            acks=bool(batch.chunks))  # fmt: skip
        self._pending = None
        transport, flow = self._transport, self._flow
        if transport is None or flow is None or transport.is_closing():
            return
        self._settle(batch, answer)
        flow.resume("wait")
        try:
            self._process()
        except Exception:  # a bug: never leave the connection reading into a growing backlog
            log.exception("closing connection: failed to resume", extra={"peer": self._peer})
            transport.abort()
            return
        if self._closing is not None:
            self._close_if_safe()

    def _timed_out(self) -> None:
        timeout = self._server.settings.message_timeout
        if self._flow is not None and self._flow.paused:  # we are the ones not reading
            self._later("message", timeout, self._timed_out)
            return
        self._cancel("message")
        self._refuse("message_timeout", f"a message was not complete {timeout:g} s after it began")

    def _refuse(self, reason: str, detail: str) -> None:
        metrics.INPUT_ERRORS.labels(self._server.settings.name, reason).inc()
        if connections := self._server.bad_input_warning.hit():
            log.warning(
                "closing connection: bad input",
                extra={"source": self._server.settings.name, "peer": self._peer,
                       "reason": reason, "detail": detail[:200],
                       "connections_since_last_line": connections},
            )  # fmt: skip
        if self._transport is not None:
            self._abandon_pending(reason)
            self._transport.abort()

    # --- closing at a safe moment --------------------------------------------------------

    def begin_close(self, cause: str) -> None:
        """Close this connection at its first safe moment (see the module's docstring): now if
        it has been quiet for ``drain_quiet_period``, else right after a read; reset after
        ``drain_timeout`` whatever happens."""
        if self._closing is not None or self._transport is None:
            return
        self._closing = cause
        if self._trickle and not self.uses_acks:
            # A connection read in bursts is read at once from now on, but for one delay no
            # read is a safe moment: a burst's read comes at no particular moment of the
            # client's writes, and lines may still wait in the client's kernel (Nagle holds
            # small writes until the last is acknowledged). After it, as for any connection,
            # the read a write brings is the moment.
            self._safe_from = time.monotonic() + self._server.settings.trickle_read_delay
            if self._flow is not None:
                self._cancel("trickle")
                self._flow.resume("trickle")  # the stop does not wait out the delay
        server = self._server.server
        self._later("force", server.drain_timeout, self.force_close)
        self._close_when_quiet()

    def _close_when_quiet(self) -> None:
        quiet = self._server.server.drain_quiet_period
        silent = time.monotonic() - self.last_activity
        if silent >= quiet:
            self._close_if_safe()
        transport = self._transport
        if transport is not None and not transport.is_closing() and not self._discarding:
            self._later("quiet", max(quiet - silent, 0.05), self._close_when_quiet)

    def _close_if_safe(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self._discarding:
            return
        if self._pending is not None or self._decoder.pending_bytes or self._unwritten:
            return  # a message is in progress, waits for buffer room, or for its ack
        if self.uses_acks:
            self._discarding = True
            if transport.can_write_eof():
                transport.write_eof()  # sent once the acks already written are
            else:  # TLS: close_notify and FIN once the acks are written
                transport.close()
            self._count_close("fin")
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and not reset_if_drained(sock):
            return  # more has arrived: the next read brings it, then we look again
        transport.abort()
        self._count_close("reset")

    def force_close(self) -> None:
        """No safe moment came in time (or the stop's drain is over): reset, counting what the
        client sent that no buffer took."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._discarding:  # acked and FIN sent; the client just never closed its side
            transport.abort()
            return
        self._abandon_pending("closed_blocked")
        if self._decoder.pending_bytes and (
            connections := self._server.cut_message_warning.hit()
        ):
            log.warning(
                "closing connection with a message in progress",
                extra={"source": self._server.settings.name, "peer": self._peer,
                       "bytes": self._decoder.pending_bytes, "cause": self._closing,
                       "connections_since_last_line": connections},
            )  # fmt: skip
        sock = transport.get_extra_info("socket")
        if sock is not None:
            reset_now(sock)
        transport.abort()
        self._count_close("forced")

    def _abandon_pending(self, reason: str) -> None:
        """The batch told to wait goes with its connection: count it."""
        if self._waiting is not None:
            self._waiting.cancel()
        if self._pending is not None:
            self._pipeline.abandon(self._pending.tag, len(self._pending.entries), reason,
                                   self._server.settings.label)  # fmt: skip

    def _count_close(self, how: str) -> None:
        metrics.CONNECTIONS_CLOSED.labels(self._server.settings.name, self._closing, how).inc()

    def _later(self, name: str, delay: float, callback: Any, *args: Any) -> None:
        self._cancel(name)
        self._timers[name] = asyncio.get_running_loop().call_later(delay, callback, *args)

    def _cancel(self, name: str) -> None:
        if (timer := self._timers.pop(name, None)) is not None:
            timer.cancel()


def security_of(settings: ForwardSource) -> Security | None:
    """The handshake's settings, with clients' host names resolved (once, at start)."""
    config = settings.security
    if config is None:
        return None
    clients = []
    for client in config.clients:
        network = client.network or socket.gethostbyname(client.host or "")
        clients.append(Client(ipaddress.ip_network(network, strict=False), client.shared_key,
                              tuple(client.users)))  # fmt: skip
    return Security(
        config.self_hostname, config.shared_key, config.user_auth,
        config.allow_anonymous_source,
        tuple(User(u.username, u.password) for u in config.users), tuple(clients),
    )  # fmt: skip


class _HeartbeatProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._transport is not None:
            self._transport.sendto(HEARTBEAT_REPLY, addr)


class ForwardServer:
    def __init__(self, settings: ForwardSource, pipeline: Pipeline, server: Server) -> None:
        self.settings = settings
        self.server = server
        self.pipeline = pipeline
        self.connections: ConnectionSet[ForwardConnection] = ConnectionSet(settings.name)
        self.bad_input_warning = Throttle(BAD_INPUT_WARNING_INTERVAL)
        self.cut_message_warning = Throttle(BAD_INPUT_WARNING_INTERVAL)
        self.refused_warning = Throttle(BAD_INPUT_WARNING_INTERVAL)
        self.auth_warning = Throttle(BAD_INPUT_WARNING_INTERVAL)
        self.security = security_of(settings)
        self._m_refused = metrics.CONNECTIONS_REFUSED.labels(settings.name)
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._tls: ssl.SSLContext | None = None
        self._heartbeat: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._adopting: list[asyncio.Task[Any]] = []  # connections taken from the accept queue

    def refuse_connection(self, peer: str) -> None:
        self._m_refused.inc()
        if refused := self.refused_warning.hit():
            log.warning(
                "refusing connection: max_connections are open",
                extra={"source": self.settings.name, "peer": peer,
                       "max_connections": self.settings.max_connections,
                       "refused_since_last_line": refused},
            )  # fmt: skip

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, listener: Listener | None = None) -> None:
        loop = asyncio.get_running_loop()
        tls = server_context(self.settings.tls) if self.settings.tls is not None else None
        self._tls = tls
        if listener is not None:
            self._server = await loop.create_server(
                lambda: ForwardConnection(self), sock=listener.tcp, ssl=tls
            )
        else:
            self._server = await loop.create_server(
                lambda: ForwardConnection(self), self.settings.bind, self.settings.port,
                reuse_address=True, ssl=tls,
            )  # fmt: skip
        if self.settings.heartbeat:
            if listener is not None and listener.udp is not None:
                self._heartbeat, _ = await loop.create_datagram_endpoint(
                    _HeartbeatProtocol, sock=listener.udp
                )
            else:
                self._heartbeat, _ = await loop.create_datagram_endpoint(
                    _HeartbeatProtocol, local_addr=(self.settings.bind, self.port)
                )
        if self.settings.idle_timeout is not None:
            self._sweeper = loop.create_task(self._close_idle(self.settings.idle_timeout))
        log.info(
            "forward input listening",
            extra={"source": self.settings.name, "bind": self.settings.bind, "port": self.port},
        )

    async def _close_idle(self, timeout: float) -> None:
        """Close connections silent for ``timeout``; a sweep, not a timer per read, which would
        cost every read of every busy connection."""
        while True:
            await asyncio.sleep(max(0.05, timeout / 4))
            now = time.monotonic()
            for conn in self.connections:
                if now - conn.last_activity > timeout:
                    conn.begin_close("idle")

    def stop_accepting(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._close_listener(self._server)
        if self._heartbeat is not None:
            self._heartbeat.close()

    def _close_listener(self, server: asyncio.Server) -> None:
        """Stop listening without resetting what the kernel has queued.

        Closing a listening socket resets the connections in its accept queue (completed by the
        kernel, not yet accepted by the loop), and a client without acks has already written
        into one: that write would be lost. So a copy of the socket keeps it listening while
        the loop's is closed; the queue is emptied from the copy, and the copy is closed right
        after the accept that finds it empty (what completes in between, microseconds, is still
        reset). The connections taken close at their safe moment like the others."""
        listening = socket.socket(fileno=os.dup(server.sockets[0].fileno()))
        server.close()
        loop = asyncio.get_running_loop()
        with listening:
            listening.setblocking(False)
            while True:
                try:
                    conn, _ = listening.accept()
                except BlockingIOError:
                    break
                except OSError as exc:  # out of descriptors, say: what is left is reset
                    log.error(f"stopping: cannot accept a queued connection: {exc}",
                              extra={"source": self.settings.name})  # fmt: skip
                    break
                adopt = loop.connect_accepted_socket(
                    lambda: ForwardConnection(self), conn, ssl=self._tls
                )
                task = loop.create_task(adopt)
                task.add_done_callback(self._adopted)
                self._adopting.append(task)
        if self._adopting:
            log.info(
                "stopping: connections taken from the accept queue",
                extra={"source": self.settings.name, "connections": len(self._adopting)},
            )

    def _adopted(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.info(  # a TLS handshake that failed, say: the client learns it as well
                f"stopping: a connection taken from the accept queue failed: {exc!r}",
                extra={"source": self.settings.name},
            )

    async def drain(self, until: float) -> None:
        await self.connections.drain("stop", until, joining=self._adopting)
