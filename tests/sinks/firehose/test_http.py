"""The sink's HTTP client against a scripted server on a real socket: framing, keep-alive,
and that a connection whose answer is not complete is never used again."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from aggregator.sinks.firehose.http import HttpClient, HttpError, Response, proxy_for
from tests.sources.test_forward import run  # uvloop, as the service runs, with a time bound

Answer = Callable[["Server", int, bytes], bytes | None]
"""(server, request number, request bytes) -> what to write back (None: nothing); b"" closes."""


class Server:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.closed_by_client = 0
        self.requests = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                self.requests += 1
                reply = self.answer(self, self.requests, head + body)
                if reply == b"":
                    writer.close()
                    return
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1


@asynccontextmanager
async def serving(answer: Answer) -> AsyncIterator[tuple[Server, HttpClient]]:
    server = Server(answer)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client = HttpClient(f"http://127.0.0.1:{port}", limit=4, connect_timeout=2.0)
    try:
        yield server, client
    finally:
        await client.close()
        for writer in server.writers:
            writer.close()
        listener.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


HEADERS = {"host": "example", "x-amz-target": "T"}


def test_a_kept_alive_connection_carries_the_next_requests() -> None:
    async def test() -> None:
        async with serving(lambda _, n, __: ok(b"answer %d" % n)) as (server, client):
            for n in (1, 2, 3):
                assert await client.post(HEADERS, b"x" * 1000) == Response(200, b"answer %d" % n)
            assert server.connections == 1

    run(test)


def test_the_request_is_post_with_the_headers_and_its_length() -> None:
    seen: list[bytes] = []

    def answer(_: Server, n: int, request: bytes) -> bytes:
        seen.append(request)
        return ok(b"{}")

    async def test() -> None:
        async with serving(answer) as (_, client):
            await client.post(HEADERS, b"body")
        head, body = seen[0].split(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST / HTTP/1.1"
        assert set(lines[1:]) == {b"host: example", b"x-amz-target: T", b"content-length: 4"}
        assert body == b"body"

    run(test)


def test_chunked_and_read_to_the_end_answers_are_read_whole() -> None:
    chunked = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    answers = {
        1: b"HTTP/1.1 100 Continue\r\n\r\n"  # informational: the answer comes after it
        b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
        2: b"HTTP/1.1 503 Busy\r\nConnection: close\r\n\r\nuntil the end",
    }

    def answer(server: Server, n: int, _: bytes) -> bytes | None:
        if n == 2:  # written, then the connection is closed: the answer ends with it
            asyncio.get_running_loop().call_later(0.05, server.writers[-1].close)
        return answers[n]

    async def test() -> None:
        async with serving(answer) as (_, client):
            assert await client.post(HEADERS, b"") == Response(400, b"abcde")
            assert await client.post(HEADERS, b"") == Response(503, b"until the end")

    run(test)


def test_connection_close_is_not_reused() -> None:
    async def test() -> None:
        async with serving(lambda _, n, __: ok(b"a", b"Connection: close\r\n")) as (server, client):
            await client.post(HEADERS, b"")
            await client.post(HEADERS, b"")
            assert server.connections == 2

    run(test)


@pytest.mark.parametrize(
    "reply",
    [
        b"",  # closed before any answer
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",  # closed inside the body
        b"SSH-2.0-OpenSSH_9.6\r\n",  # not HTTP
    ],
)
def test_an_answer_that_never_completes_is_a_connection_error(reply: bytes) -> None:
    def answer(server: Server, n: int, _: bytes) -> bytes | None:
        if reply and n == 1:
            asyncio.get_running_loop().call_later(0.05, server.writers[-1].close)
        return reply if n == 1 else ok(b"fine")

    async def test() -> None:
        async with serving(answer) as (server, client):
            with pytest.raises(HttpError):
                await asyncio.wait_for(client.post(HEADERS, b"x"), 5)
            # The next request gets a connection of its own, and its own answer.
            assert await client.post(HEADERS, b"x") == Response(200, b"fine")
            assert server.connections == 2

    run(test)


def test_a_late_answer_is_never_taken_for_the_next_requests() -> None:
    def answer(server: Server, n: int, _: bytes) -> bytes | None:
        if n == 1:  # answered after the caller gave up
            asyncio.get_running_loop().call_later(0.3, server.writers[0].write, ok(b"late"))
            return None
        return ok(b"second")

    async def test() -> None:
        async with serving(answer) as (server, client):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await client.post(HEADERS, b"x")
            await asyncio.sleep(0.1)
            assert server.closed_by_client == 1  # at once, not when the late answer comes
            await asyncio.sleep(0.3)
            assert await client.post(HEADERS, b"x") == Response(200, b"second")
            assert server.connections == 2

    run(test)


def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    async def test() -> None:
        async with serving(lambda _, n, __: ok(b"%d" % n)) as (server, client):
            await client.post(HEADERS, b"")
            server.writers[0].close()
            await asyncio.sleep(0.1)
            assert await client.post(HEADERS, b"") == Response(200, b"2")
            assert server.connections == 2

    run(test)


def test_https_verifies_the_server_against_the_given_cas(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def test() -> None:
        server = Server(lambda _, n, __: ok(b"over tls %d" % n))
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=context)
        url = f"https://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        trusting = HttpClient(url, limit=1, connect_timeout=2.0, cafile=str(cert))
        assert await trusting.post(HEADERS, b"x") == Response(200, b"over tls 1")
        assert await trusting.post(HEADERS, b"x") == Response(200, b"over tls 2")
        assert server.connections == 1
        await trusting.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # an OSError: a network failure
            await HttpClient(url, limit=1, connect_timeout=2.0).post(HEADERS, b"x")
        for writer in server.writers:
            writer.close()
        listener.close()

    run(test)


def test_nothing_listening_is_an_os_error() -> None:
    async def test() -> None:
        listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        listener.close()
        await listener.wait_closed()
        client = HttpClient(f"http://127.0.0.1:{port}", limit=1, connect_timeout=2.0)
        with pytest.raises(OSError):
            await client.post(HEADERS, b"")

    run(test)


class Proxy:
    """An HTTP proxy as squid behaves: CONNECT tunnels, and requests for a whole URL sent on
    with the path alone; it asks for credentials when ``password`` is set."""

    def __init__(self, password: str | None = None) -> None:
        self.password = password
        self.heads: list[bytes] = []
        self.sent: list[bytes] = []
        """Every byte clients sent through, heads included."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        self.sent.append(head)
        method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
        if self.password is not None:
            token = base64.b64encode(b"user:" + self.password.encode())
            if b"proxy-authorization: basic " + token.lower() not in head.lower():
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                writer.close()
                return
        if method == b"CONNECT":
            host, port = target.decode().rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = urlsplit(target.decode())
            up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port)
            up_writer.write(head.replace(target, (url.path or "/").encode(), 1))
        await asyncio.gather(pipe(reader, up_writer, self.sent), pipe(up_reader, writer))


async def pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[bytes] | None = None
) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            if seen is not None:
                seen.append(data)
            writer.write(data)
            await writer.drain()
    writer.close()


def test_http_goes_through_a_proxy_asked_for_the_whole_url_with_credentials() -> None:
    async def test() -> None:
        server = Server(lambda _, n, __: ok(b"via proxy %d" % n))
        proxy = Proxy(password="p@ss")
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        proxying = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        port, proxy_port = (s.sockets[0].getsockname()[1] for s in (listener, proxying))
        client = HttpClient(f"http://127.0.0.1:{port}/", limit=1, connect_timeout=2.0,
                            proxy=f"http://user:p%40ss@127.0.0.1:{proxy_port}")  # fmt: skip
        assert await client.post(HEADERS, b"x") == Response(200, b"via proxy 1")
        assert await client.post(HEADERS, b"x") == Response(200, b"via proxy 2")
        assert proxy.heads[0].startswith(f"POST http://127.0.0.1:{port}/ HTTP/1.1".encode())
        assert len(proxy.heads) == 1  # one kept-alive connection through the proxy
        await client.close()
        wrong = HttpClient(f"http://127.0.0.1:{port}/", limit=1, connect_timeout=2.0,
                           proxy=f"http://user:guess@127.0.0.1:{proxy_port}")  # fmt: skip
        assert (await wrong.post(HEADERS, b"x")).status == 407
        for writer in server.writers:
            writer.close()

    run(test)


def test_https_goes_through_a_connect_tunnel_and_a_refusal_is_a_network_error(
    certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def test() -> None:
        server = Server(lambda _, n, __: ok(b"tunnelled %d" % n))
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=context)
        proxy = Proxy()
        proxying = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        port, proxy_port = (s.sockets[0].getsockname()[1] for s in (listener, proxying))
        client = HttpClient(f"https://127.0.0.1:{port}", limit=1, connect_timeout=2.0,
                            cafile=str(cert), proxy=f"127.0.0.1:{proxy_port}")  # fmt: skip
        assert await client.post(HEADERS, b"x") == Response(200, b"tunnelled 1")
        assert proxy.heads == [f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nhost: 127.0.0.1:{port}"
                               "\r\n\r\n".encode()]  # fmt: skip
        await client.close()
        proxy.password = "needed"
        refused = HttpClient(f"https://127.0.0.1:{port}", limit=1, connect_timeout=2.0,
                             cafile=str(cert), proxy=f"127.0.0.1:{proxy_port}")  # fmt: skip
        with pytest.raises(HttpError, match=r"the proxy refused the tunnel: HTTP/1\.1 407"):
            await refused.post(HEADERS, b"x")
        for writer in server.writers:
            writer.close()

    run(test)


def test_the_environments_proxy_as_the_sdks_read_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                 "no_proxy", "ALL_PROXY", "all_proxy"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert proxy_for("https://firehose.eu-west-1.amazonaws.com") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal")
    assert proxy_for("https://firehose.eu-west-1.amazonaws.com") == "http://proxy:3128"
    assert proxy_for("http://emulator:4566") is None  # HTTP_PROXY is for http
    assert proxy_for("https://vpce.firehose.internal") is None  # NO_PROXY
    assert proxy_for("https://x.internal", "http://given:1") == "http://given:1"
