"""The forward input's own closes, in one process on real sockets: keepalive, the reset after a
read for clients without acks, the FIN after the last ack, messages completed first, the bound,
and max_connection_age."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
import uvloop

from aggregator import metrics
from aggregator.config.model import Config
from aggregator.pipeline import Pipeline
from aggregator.protocol import encode_message
from aggregator.sources.forward import ACK_HIGH_WATER, ForwardServer
from aggregator.sources.tcp import unread_bytes
from benchmarks.docker_client import DockerLikeClient
from emulator import EmulatorThread
from tests.test_formatting import deep


def config(quiet: float = 10, drain_timeout: float = 2, **forward: Any) -> Config:
    return Config.model_validate({
        "server": {"drain_quiet_period": quiet, "drain_timeout": drain_timeout},
        "sources": [{"type": "forward", "bind": "127.0.0.1", "port": 0, "heartbeat": False,
                     **forward}],
        "routes": [{"match": "**", "destination": "out"}],
        "destinations": {"out": {"type": "null", "buffer": {"flush_interval": "1h"}}},
    })  # fmt: skip


def small_buffer_config(endpoint: str, **forward: Any) -> Config:
    """Everything to a Firehose at ``endpoint`` through an 8 KiB buffer: a stalled emulator
    blocks the senders at once."""
    return Config.model_validate({
        "sources": [{"type": "forward", "bind": "127.0.0.1", "port": 0, **forward}],
        "routes": [{"match": "**", "destination": "fh"}],
        "destinations": {"fh": {
            "type": "firehose", "delivery_stream": "s", "region": "us-east-1",
            "endpoint_url": endpoint,
            "buffer": {"chunk_limit_size": "4KiB", "total_limit_size": "8KiB"}}},
    })  # fmt: skip


@asynccontextmanager
async def serve(cfg: Config) -> AsyncIterator[ForwardServer]:
    pipeline = Pipeline(cfg)
    await pipeline.start()
    server = ForwardServer(cfg.sources[0], pipeline, cfg.server)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        server.stop_accepting()
        await server.drain(time.monotonic())
        for dest in pipeline.destinations.values():
            await dest.flusher.close(time.monotonic() + 1)
            await dest.flusher.release()


def buffered(server: ForwardServer) -> int:
    return server.pipeline.destinations["out"].flusher.volatile_events


def metric(name: str, **labels: str) -> float:
    """The sum of this process's samples called ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for family in metrics.REGISTRY.collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def closes(how: str, cause: str = "stop") -> float:
    return metric("aggregator_connections_closed_total", source="forward", cause=cause, how=how)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop.run(asyncio.wait_for(main(), 30))


def message(i: int, chunk: str | None = None) -> bytes:
    return encode_message("app", 1700000000, {"id": i}, chunk=chunk)


async def until(predicate: Callable[[], Any], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_accepted_sockets_use_tcp_keepalive() -> None:
    async def main() -> None:
        cfg = config(keepalive_idle=42, keepalive_interval=7, keepalive_probes=4)
        async with serve(cfg) as server:
            with socket.create_connection(("127.0.0.1", server.port)):
                await until(lambda: len(server.connections) == 1)
                [conn] = list(server.connections._connections)
                sock = conn._transport.get_extra_info("socket")  # type: ignore[union-attr]
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 42
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 7
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4

    run(main)


def test_a_client_without_acks_is_reset_right_after_its_next_read() -> None:
    async def main() -> None:
        async with serve(config()) as server:
            resets = closes("reset")
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.sendall(message(1))
                await until(lambda: buffered(server) == 1)
                server.connections._connections.copy().pop().begin_close("stop")
                await asyncio.sleep(0.1)
                client.sendall(message(2))  # read, buffered, then the reset
                await until(lambda: len(server.connections) == 0)
                assert buffered(server) == 2
                with pytest.raises(OSError):  # so the client sends it again elsewhere
                    client.sendall(message(3))
            assert closes("reset") == resets + 1

    run(main)


def test_a_client_with_acks_gets_every_ack_then_eof() -> None:
    async def main() -> None:
        async with serve(config()) as server:
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.sendall(message(1, chunk="c1"))
                await until(lambda: buffered(server) == 1)
                conn = server.connections._connections.copy().pop()
                conn.begin_close("stop")
                await asyncio.sleep(0.1)  # still connected: waits for a quiet moment or a read
                client.sendall(message(2, chunk="c2"))
                await until(lambda: conn._discarding)
                client.sendall(message(3, chunk="c3"))  # after our FIN: not ours to take
                await asyncio.sleep(0.1)
                client.settimeout(2)
                replies, data = [], b"x"
                while data:
                    data = await asyncio.to_thread(client.recv, 4096)
                    replies.append(data)
                acks = list(msgpack.Unpacker(io.BytesIO(b"".join(replies))))
                assert acks == [{"ack": "c1"}, {"ack": "c2"}]  # then EOF: c3 is sent again
                assert buffered(server) == 2

    run(main)


def test_a_message_split_across_reads_is_completed_before_the_close() -> None:
    async def main() -> None:
        async with serve(config(quiet=0)) as server:  # closes at once if it can
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                whole = message(1)
                client.sendall(whole[:5])
                await until(lambda: len(server.connections) == 1)
                await asyncio.sleep(0.05)
                server.connections._connections.copy().pop().begin_close("stop")
                await asyncio.sleep(0.2)
                assert len(server.connections) == 1  # not in the middle of a message
                client.sendall(whole[5:])
                await until(lambda: len(server.connections) == 0)
                assert buffered(server) == 1

    run(main)


def test_with_no_safe_moment_the_connection_is_reset_at_drain_timeout() -> None:
    async def main() -> None:
        async with serve(config(drain_timeout=0.3)) as server:
            forced = closes("forced")
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.sendall(message(1)[:5])  # and never the rest
                await until(lambda: len(server.connections) == 1)
                started = time.monotonic()
                server.connections._connections.copy().pop().begin_close("stop")
                await until(lambda: len(server.connections) == 0)
                assert 0.25 < time.monotonic() - started < 1.0
            assert closes("forced") == forced + 1

    run(main)


@pytest.mark.parametrize("acks", [False, True])
def test_max_connection_age_moves_a_busy_client_without_losing_a_message(acks: bool) -> None:
    async def main() -> None:
        cfg = config(max_connection_age=0.2, max_connection_age_jitter=0.5)
        async with serve(cfg) as server:
            client = DockerLikeClient([server.port], "aged", acks=acks, interval=0.005, count=300)
            client.start()
            await until(lambda: not client.is_alive(), timeout=20)
            await until(lambda: buffered(server) >= len(client.sent), timeout=2)
            assert client.failed == []
            assert buffered(server) == len(client.sent) == 300  # none lost, none twice
            assert client.connections >= 5

    run(main)


def test_what_the_socket_holds_is_read_before_the_reset() -> None:
    """A read that ends between two messages while more waits in the socket is not a safe
    moment: every byte that had reached us when the close began is taken. (Bytes still in the
    client's own kernel when the reset goes out cannot be: that is what acks are for.)"""

    async def main() -> None:
        async with serve(config()) as server:
            def kib(i: int) -> bytes:  # reads of whole KiBs end between two messages
                empty = len(encode_message("app", 1700000000, {"id": i, "p": ""}))
                pad = 1024 - empty - 2  # a str16 header is 2 bytes longer than an empty str's
                return encode_message("app", 1700000000, {"id": i, "p": "x" * pad})

            burst = b"".join(kib(i) for i in range(512))
            assert len(burst) == 512 * 1024  # more than one read (uvloop reads 256 KiB at most)
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                await until(lambda: len(server.connections) == 1)
                conn = server.connections._connections.copy().pop()
                transport = conn._transport
                assert transport is not None
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * len(burst))  # room for all
                transport.pause_reading()
                client.sendall(burst)
                await until(lambda: unread_bytes(sock) == len(burst))
                conn.begin_close("stop")
                transport.resume_reading()
                await until(lambda: len(server.connections) == 0)
                assert buffered(server) == 512

    run(main)


def test_an_unencodable_event_while_blocked_on_a_full_buffer_costs_only_itself() -> None:
    """The wedge of issue 8: the connection waits for buffer room with a batch pending, and the
    batch holds an event that cannot be encoded."""

    async def main() -> None:
        with EmulatorThread() as firehose:
            firehose.stall()
            async with serve(small_buffer_config(firehose.endpoint_url)) as server:
                filler = [encode_message("app", 1700000000, {"i": i, "pad": "x" * 200})
                          for i in range(100)]  # fmt: skip
                chunk = "last"
                with socket.create_connection(("127.0.0.1", server.port)) as client:
                    client.sendall(b"".join(filler))
                    store = server.pipeline.destinations["fh"].flusher.store
                    await until(lambda: not store.has_room())
                    client.sendall(encode_message("app", 1700000000, deep(300))
                                   + encode_message("app", 1700000000, {"i": 100}, chunk=chunk))
                    await asyncio.sleep(0.2)
                    firehose.resume()
                    client.settimeout(10)
                    reply = await asyncio.to_thread(client.recv, 100)
                    assert msgpack.unpackb(reply) == {"ack": chunk}
                await until(lambda: len(firehose.lines("s")) >= 101, timeout=10)
                delivered = sorted(orjson.loads(line)["i"] for line in firehose.lines("s"))
                assert delivered == list(range(101))

    run(main)


def test_acks_nobody_reads_stop_the_reading_not_grow_the_write_buffer() -> None:
    """Issue 8: a client that asks for acks and never reads them. The kernel's buffers fill,
    then our write buffer would grow by ~30 bytes per message without bound."""

    async def main() -> None:
        async with serve(config()) as server:
            message = b"".join(message_with_chunk(i) for i in range(1000))
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills sooner
                client.setblocking(False)
                await until(lambda: len(server.connections) == 1)
                [conn] = list(server.connections._connections)
                transport = conn._transport
                assert transport is not None
                sent = 0
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    try:
                        sent += client.send(message)  # until the client cannot send any more
                    except BlockingIOError:
                        await asyncio.sleep(0.2)
                        try:
                            sent += client.send(message)
                        except BlockingIOError:
                            break
                    await asyncio.sleep(0)
                assert time.monotonic() < deadline, "the sender was never stopped"
                assert transport.get_write_buffer_size() < 2 * ACK_HIGH_WATER + 256 * 1024
                events = buffered(server)
                await asyncio.sleep(0.3)
                assert buffered(server) == events  # reading stays paused

    run(main)


def message_with_chunk(i: int) -> bytes:
    return encode_message("app", 1700000000, {"i": i}, chunk=f"c{i:08d}")


def test_bad_input_is_counted_every_time_and_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with serve(config()) as server:
            before = metric("aggregator_input_errors_total", reason="not_msgpack")
            for _ in range(200):
                with socket.create_connection(("127.0.0.1", server.port)) as bad:
                    bad.sendall(b"\xc1")
                    bad.settimeout(5)
                    assert await asyncio.to_thread(bad.recv, 10) == b""
            after = metric("aggregator_input_errors_total", reason="not_msgpack")
            assert after - before == 200

    with caplog.at_level("WARNING", logger="aggregator.sources.forward"):
        run(main)
    lines = [r for r in caplog.records if r.getMessage() == "closing connection: bad input"]
    assert len(lines) == 1


def test_a_message_that_never_completes_is_reset_at_message_timeout() -> None:
    """Slowloris: a byte now and then keeps a connection busy, never complete."""

    async def main() -> None:
        async with serve(config(message_timeout=0.4)) as server:
            before = metric("aggregator_input_errors_total", reason="message_timeout")
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                whole = message(1)
                for byte in whole[:-1]:  # everything but the last byte, one at a time
                    client.sendall(bytes([byte]))
                    await asyncio.sleep(0.02)
                await until(lambda: len(server.connections) == 0, timeout=2)
            assert metric("aggregator_input_errors_total", reason="message_timeout") == before + 1
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.sendall(message(2)[:5])  # ...while a message completed in time is fine
                await asyncio.sleep(0.2)
                client.sendall(message(2)[5:])
                await until(lambda: buffered(server) == 1)
                await asyncio.sleep(0.4)
                assert len(server.connections) == 1

    run(main)


def test_a_connection_we_stopped_reading_is_not_timed_out() -> None:
    """Blocked on a full buffer, the client's next message waits on us, not on the client."""

    async def main() -> None:
        with EmulatorThread() as firehose:
            firehose.stall()
            cfg = small_buffer_config(firehose.endpoint_url, message_timeout=0.2)
            async with serve(cfg) as server:
                messages = [encode_message("app", 1700000000, {"i": i, "pad": "x" * 200})
                            for i in range(400)]  # fmt: skip
                with socket.create_connection(("127.0.0.1", server.port)) as client:
                    client.sendall(b"".join(messages[:50]))  # fills the buffer
                    store = server.pipeline.destinations["fh"].flusher.store
                    await until(lambda: not store.has_room())
                    # More than a batch, and half a message: the decoder holds bytes while
                    # the connection waits for room.
                    client.sendall(b"".join(messages[50:399]) + messages[399][:20])
                    await asyncio.sleep(1.0)  # five timeouts long, blocked all along
                    assert len(server.connections) == 1
                    firehose.resume()
                    client.sendall(messages[399][20:])
                    await until(lambda: len(firehose.lines("s")) >= 400, timeout=10)

    run(main)


def test_connections_over_max_connections_are_refused_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with serve(config(max_connections=5)) as server:
            before = metric("aggregator_connections_refused_total")
            clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
            try:
                await until(lambda: metric("aggregator_connections_refused_total") == before + 3)
                assert len(server.connections) == 5
            finally:
                for client in clients:
                    client.close()

    with caplog.at_level("WARNING", logger="aggregator.sources.forward"):
        run(main)
    refusals = [r for r in caplog.records if r.getMessage().startswith("refusing connection")]
    assert len(refusals) == 1


def test_idle_connections_are_closed_safely_and_busy_ones_kept() -> None:
    async def main() -> None:
        async with serve(config(quiet=0.1, idle_timeout=0.4)) as server:
            before = closes("reset", cause="idle")
            with socket.create_connection(("127.0.0.1", server.port)) as idle, \
                 socket.create_connection(("127.0.0.1", server.port)) as busy:  # fmt: skip
                idle.sendall(message(1))
                await until(lambda: len(server.connections) == 2)
                sent = 0
                while len(server.connections) == 2 and sent < 60:  # busy: never 0.4 s silent
                    busy.sendall(message(100 + sent))
                    sent += 1
                    await asyncio.sleep(0.05)
                assert len(server.connections) == 1 and sent >= 8  # 0.4 s at least
                with pytest.raises(OSError):  # reset: its next line goes elsewhere
                    idle.sendall(message(2))
                busy.sendall(message(999))
                await until(lambda: buffered(server) == 1 + sent + 1)
            assert closes("reset", cause="idle") == before + 1

    run(main)


async def trickle(client: socket.socket, seconds: float, chunk: bool = False) -> int:
    """Messages every 20 ms for ``seconds`` (past the first rate window); with ``chunk``, each
    waits for its ack. Returns how many were sent."""
    end, sent = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        client.sendall(message(sent, chunk=f"c{sent}" if chunk else None))
        sent += 1
        if chunk:
            await asyncio.to_thread(client.recv, 4096)
        await asyncio.sleep(0.02)
    return sent


def test_a_slow_client_without_acks_is_read_every_trickle_read_delay() -> None:
    """Docker's driver writes every line on its own: past its first second, a slow connection's
    lines wait in the socket for the delay, and one read takes them together."""
    async def main() -> None:
        async with serve(config(trickle_read_delay=1.0)) as server:
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                sent = await trickle(client, 1.2)
                await until(lambda: buffered(server) == sent)  # the last read began a delay
                client.sendall(message(1000))
                client.sendall(message(1001))
                await asyncio.sleep(0.4)
                assert buffered(server) == sent  # both still in the socket
                await until(lambda: buffered(server) == sent + 2, timeout=2)

    run(main)


def test_clients_with_acks_and_fast_clients_are_read_at_once() -> None:
    async def main() -> None:
        async with serve(config(trickle_read_delay=1.0)) as server:
            with socket.create_connection(("127.0.0.1", server.port)) as acked:
                await trickle(acked, 1.2, chunk=True)
                began = time.monotonic()
                await trickle(acked, 0.3, chunk=True)  # every ack at once, not after 1 s
                assert time.monotonic() - began < 0.9
            with socket.create_connection(("127.0.0.1", server.port)) as fast:
                bulk = b"".join(message(i) for i in range(2000))  # about 40 KiB
                end = time.monotonic() + 1.2
                while time.monotonic() < end:  # 0.8 MB/s: over the trickle rate
                    fast.sendall(bulk)
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.1)
                before = buffered(server)
                fast.sendall(message(9999))
                await until(lambda: buffered(server) == before + 1, timeout=0.5)

    run(main)


def test_a_held_connection_is_read_at_once_when_it_is_to_close() -> None:
    """The stop does not wait out a trickle's delay: what the socket holds is read at once. For
    one delay no read is a safe moment (the reads of a burst come at no particular moment of the
    client's writes, and lines may still wait in its kernel); then the reset follows the read
    of the client's next write, as for any connection."""
    async def main() -> None:
        async with serve(config(trickle_read_delay=0.5)) as server:
            resets = closes("reset")
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                sent = await trickle(client, 1.2)
                await until(lambda: buffered(server) == sent)
                client.sendall(message(1000))  # held for 0.5 s
                await asyncio.sleep(0.05)
                began = time.monotonic()
                server.connections._connections.copy().pop().begin_close("stop")
                await until(lambda: buffered(server) == sent + 1, timeout=0.3)
                client.sendall(message(1001))  # within the delay: read, kept open
                await until(lambda: buffered(server) == sent + 2, timeout=0.3)
                assert len(server.connections) == 1
                await asyncio.sleep(max(0.0, began + 0.55 - time.monotonic()))
                client.sendall(message(1002))  # read, buffered, then the reset
                await until(lambda: len(server.connections) == 0, timeout=0.3)
                assert buffered(server) == sent + 3
                with pytest.raises(OSError):  # so the client sends it again elsewhere
                    client.sendall(message(1003))
            assert closes("reset") == resets + 1

    run(main)


def test_a_connection_still_in_the_accept_queue_at_the_stop_is_read_then_reset() -> None:
    """A connection the kernel completed but the loop has not accepted when the stop closes the
    listener would be reset by that close, and a client without acks would lose the write it
    already made. It is accepted, read, and closed at its safe moment like the others."""

    async def main() -> None:
        async with serve(config()) as server:
            resets = closes("reset")
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.sendall(message(1))  # no await since: the loop has not accepted it
                server.stop_accepting()
                await server.drain(time.monotonic() + 2)
                assert buffered(server) == 1
                assert len(server.connections) == 0
                with pytest.raises(OSError):  # so the client sends it again elsewhere
                    for i in range(2, 100):
                        client.sendall(message(i))
                        await asyncio.sleep(0.01)
            assert closes("reset") == resets + 1

    run(main)


def test_a_tls_connection_still_in_the_accept_queue_joins_the_stop_after_its_handshake(
    certificate: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Its handshake only starts once the stop has taken it from the queue: the drain waits for
    it, then reads what the client sent and resets the connection. One whose handshake fails is
    logged."""
    cert, key = certificate
    client_tls = ssl.create_default_context(cafile=str(cert))

    def client(sock: socket.socket) -> None:
        with client_tls.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(message(1))
            with contextlib.suppress(OSError):
                while tls.recv(4096):
                    pass

    async def main() -> None:
        cfg = config(tls={"cert_path": str(cert), "private_key_path": str(key)})
        async with serve(cfg) as server:
            resets = closes("reset")
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            thread = threading.Thread(target=client, args=(sock,))
            thread.start()  # its ClientHello waits in the queued connection
            bad = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            bad.sendall(b"\x16\x03\x01" + b"\x00" * 50)  # not a TLS hello
            server.stop_accepting()
            await server.drain(time.monotonic() + 3)
            await asyncio.to_thread(thread.join, 5)
            bad.close()
            assert buffered(server) == 1
            assert len(server.connections) == 0
            assert closes("reset") == resets + 1  # at its safe moment, not at the deadline

    with caplog.at_level("INFO", logger="aggregator.sources.forward"):
        run(main)
    assert "taken from the accept queue failed" in caplog.text
