"""Fluentd's <security> handshake and TLS on the forward port, on real sockets, with a client
that does what out_forward does."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import msgpack
import pytest

from aggregator.config.model import Config
from aggregator.protocol import encode_message
from tests.protocol.test_handshake import OutForwardClient
from tests.sources.test_forward import buffered, metric, run, serve, until


def config(**forward: Any) -> Config:
    return Config.model_validate({
        "sources": [{"type": "forward", "bind": "127.0.0.1", "port": 0, "heartbeat": False,
                     "security": {"self_hostname": "aggregator", "shared_key": "s3cret",
                                  "handshake_timeout": 0.5},
                     **forward}],
        "routes": [{"match": "**", "destination": "out"}],
        "destinations": {"out": {"type": "null", "buffer": {"flush_interval": "1h"}}},
    })  # fmt: skip


def read_one(sock: socket.socket | ssl.SSLSocket) -> Any:
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        data = sock.recv(4096)
        if not data:
            return None
        unpacker.feed(data)
        for obj in unpacker:
            return obj


def handshake_and_send(sock: socket.socket | ssl.SSLSocket, key: str) -> tuple[bool, Any]:
    """Handshake as out_forward, then one acked event: (pong ok, ack or None)."""
    client = OutForwardClient("app-host", key)
    helo = read_one(sock)
    sock.sendall(client.ping(msgpack.packb(helo, use_bin_type=True)))
    pong = read_one(sock)
    ok, _ = client.check_pong(msgpack.packb(pong, use_bin_type=True))
    if not ok:
        return False, read_one(sock)  # then the server closes: None
    sock.sendall(encode_message("app", 1700000000, {"a": 1}, chunk="c1"))
    return True, read_one(sock)


async def connect(port: int, tls: ssl.SSLContext | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if tls is not None:
        sock = await asyncio.to_thread(tls.wrap_socket, sock, server_hostname="127.0.0.1")
    return sock


def test_the_right_key_gets_in_and_a_wrong_one_is_refused_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with serve(config()) as server:
            with await connect(server.port) as sock:
                assert await asyncio.to_thread(handshake_and_send, sock, "s3cret") == (
                    True, {"ack": "c1"})  # fmt: skip
            before = metric("aggregator_input_errors_total", reason="auth_failed")
            with await connect(server.port) as sock:
                assert await asyncio.to_thread(handshake_and_send, sock, "wrong") == (False, None)
            assert metric("aggregator_input_errors_total", reason="auth_failed") == before + 1
            assert buffered(server) == 1

    with caplog.at_level("WARNING", logger="aggregator.sources.forward"):
        run(main)
    [line] = [r for r in caplog.records if "authentication failed" in r.getMessage()]
    assert line.reason == "shared_key mismatch" and line.hostname == "app-host"  # type: ignore[attr-defined]


def test_events_before_the_handshake_are_not_taken() -> None:
    async def main() -> None:
        async with serve(config()) as server:
            with await connect(server.port) as sock:
                await asyncio.to_thread(read_one, sock)  # the HELO
                sock.sendall(encode_message("app", 1700000000, {"a": 1}, chunk="c1"))
                pong = await asyncio.to_thread(read_one, sock)
                assert pong[:3] == ["PONG", False, "invalid ping message"]
                assert await asyncio.to_thread(read_one, sock) is None  # closed
            assert buffered(server) == 0

    run(main)


def test_a_client_that_never_shakes_hands_is_closed_at_the_handshake_timeout() -> None:
    async def main() -> None:
        async with serve(config()) as server:
            before = metric("aggregator_input_errors_total", reason="handshake_timeout")
            with await connect(server.port) as sock:
                await asyncio.to_thread(read_one, sock)  # the HELO, and nothing more from us
                await until(lambda: len(server.connections) == 0, timeout=3)
            assert metric("aggregator_input_errors_total", reason="handshake_timeout") == before + 1

    run(main)


@pytest.mark.parametrize("from_env", [False, True], ids=["files", "pem-text"])
def test_tls_with_the_handshake(certificate: tuple[Path, Path], from_env: bool) -> None:
    cert, key = certificate
    tls = (
        {"cert_pem": cert.read_text(), "private_key_pem": key.read_text()}
        if from_env
        else {"cert_path": str(cert), "private_key_path": str(key)}
    )
    client_tls = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        async with serve(config(tls=tls)) as server:
            with await connect(server.port, client_tls) as sock:
                assert sock.version() in ("TLSv1.2", "TLSv1.3")
                assert await asyncio.to_thread(handshake_and_send, sock, "s3cret") == (
                    True, {"ack": "c1"})  # fmt: skip
            with await connect(server.port) as plain:  # no TLS: no HELO, no way in
                plain.settimeout(2)
                plain.sendall(b"\x16\x03\x01" + b"\x00" * 50)  # not even a valid hello
                assert await asyncio.to_thread(read_one, plain) is None
            assert buffered(server) == 1

    run(main)
