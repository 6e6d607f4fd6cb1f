"""One request shape over kept-alive HTTP/1.1 connections: POST a body, read the whole answer.

Why not aiohttp's client: for PutRecordBatch it spent 300-500 us of CPU a call more than this
module (a 500-record call against the emulator, in one process, taking turns: 961-1,330 us
against 701-846 us, body and signing included), about a tenth of a worker's time at 500
records a call. The answer is parsed by httptools (llhttp, in C): status, headers, bodies with
Content-Length or chunked, or read to the end of the connection.

A connection carries one request at a time and goes back to the pool only after a complete
answer that lets it be kept; anything else (an error, a timeout, a cancellation) closes it, so
a late answer can never be read as the answer to the next request.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import time
import urllib.request
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

import httptools

KEEPALIVE_TIMEOUT = 15.0
"""Seconds an idle connection is reused for (aiohttp's default): servers close idle ones, and a
request written to a connection the server is closing fails."""


class HttpError(ConnectionError):
    """The connection failed or the answer was not HTTP: nothing is known of the request."""


class Response(NamedTuple):
    status: int
    body: bytes


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._body: list[bytes] = []
        self._headers_done = False
        self._framed = False  # Content-Length or Transfer-Encoding: the end is not the EOF
        self.keep_alive = False

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # nothing was asked: the server is not speaking HTTP to us
            self._fail(HttpError(f"{len(data)} bytes arrived unasked"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpError(f"not an HTTP answer: {exc}"))

    def eof_received(self) -> bool:
        if self._headers_done and not self._framed:
            self.on_message_complete()  # an answer that ends where the connection does
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(HttpError(f"connection closed: {exc!r}" if exc else "connection closed"))

    # --- httptools callbacks -------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self.keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() < 200:  # 100 Continue and its kind: not the answer
            self._body = []
            self._headers_done = self._framed = False
            return
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            waiter.set_result(Response(self._parser.get_status_code(), body))

    # --- the client's side ---------------------------------------------------------------

    def request(self, head: bytes, body: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self._body = []
        self._headers_done = self._framed = self.keep_alive = False
        self.transport.writelines((head, body))  # no copy of the body into one buffer
        return self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: HttpError) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()


def proxy_for(url: str, configured: str | None = None) -> str | None:
    """The proxy for requests to ``url``: ``configured``, else the environment's as the AWS SDKs
    read it (HTTPS_PROXY for https, HTTP_PROXY for http, either case), unless NO_PROXY names
    the host."""
    if configured:
        return configured
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme)
    # Not in typeshed, but in urllib.request since Python 3.3: NO_PROXY as curl reads it.
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if proxy and not bypass(parts.hostname or "", proxies):
        return proxy
    return None


class HttpClient:
    """POSTs to one URL's host over at most ``limit`` connections at once. HTTPS verifies the
    server against the system's CAs, or those of ``cafile``. Through ``proxy``
    (``http://[user:password@]host:port``) when given: HTTPS in a CONNECT tunnel, HTTP as
    requests to the proxy for the whole URL."""

    def __init__(
        self, url: str, *, limit: int, connect_timeout: float, cafile: str | None = None,
        proxy: str | None = None,
    ) -> None:  # fmt: skip
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context(cafile=cafile) if parts.scheme == "https" else None
        self._target = (parts.path or "/").encode()
        self._connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []
        self._proxy: tuple[str, int] | None = None
        self._proxy_auth = b""
        if proxy:
            via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if via.scheme != "http" or not via.hostname:
                raise ValueError(f"not an http:// proxy: {proxy!r}")
            self._proxy = (via.hostname, via.port or 80)
            if via.username is not None:
                user = f"{unquote(via.username)}:{unquote(via.password or '')}"
                token = base64.b64encode(user.encode()).decode()
                self._proxy_auth = f"proxy-authorization: Basic {token}\r\n".encode()
            if self._ssl is None:  # plain HTTP: the proxy is asked for the whole URL
                self._target = f"http://{self._host}:{self._port}".encode() + self._target

    async def post(self, headers: Mapping[str, str], body: bytes) -> Response:
        """One request and its whole answer; raises HttpError, OSError or TimeoutError."""
        head = b"".join((
            b"POST ", self._target, b" HTTP/1.1\r\n",
            "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode(),
            self._proxy_auth if self._ssl is None else b"",
            b"content-length: %d\r\n\r\n" % len(body),
        ))  # fmt: skip
        async with self._slots:
            connection = self._reusable() or await self._connect()
            try:
                response = await connection.request(head, body)
            except BaseException:
                # Without its whole answer a connection is never reused (the answer may still
                # come, and would be read as the next request's); close it now, not then.
                connection.close()
                raise
            if connection.keep_alive and connection.transport is not None:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
            else:
                connection.close()
            return response

    def _reusable(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()  # the most recent: the least likely to be closing
            transport = connection.transport
            fresh = now - connection.idle_since < KEEPALIVE_TIMEOUT
            if fresh and transport is not None and not transport.is_closing():
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        server_hostname = self._host if self._ssl is not None else None
        async with asyncio.timeout(self._connect_timeout):
            if self._proxy is None:
                _, connection = await loop.create_connection(
                    _Connection, self._host, self._port, ssl=self._ssl,
                    server_hostname=server_hostname,
                )  # fmt: skip
            elif self._ssl is None:
                _, connection = await loop.create_connection(_Connection, *self._proxy)
            else:
                _, connection = await loop.create_connection(
                    _Connection, sock=await self._tunnel(), ssl=self._ssl,
                    server_hostname=server_hostname,
                )  # fmt: skip
        return connection

    async def _tunnel(self) -> socket.socket:
        """A socket to the proxy, through which the proxy has connected us to the host."""
        assert self._proxy is not None
        loop = asyncio.get_running_loop()
        family, kind, proto, _, address = (
            await loop.getaddrinfo(*self._proxy, type=socket.SOCK_STREAM)
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            target = f"{self._host}:{self._port}"
            await loop.sock_sendall(sock, f"CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n"
                                    .encode() + self._proxy_auth + b"\r\n")  # fmt: skip
            answer = b""
            while b"\r\n\r\n" not in answer:  # the proxy says nothing more before we speak
                data = await loop.sock_recv(sock, 4096)
                if not data or len(answer) > 65536:
                    raise HttpError("the proxy closed the connection or said too much")
                answer += data
            status = answer.split(b"\r\n", 1)[0]
            if status.split(b" ")[1:2] != [b"200"]:
                raise HttpError(f"the proxy refused the tunnel: {status.decode(errors='replace')}")
        except BaseException:
            sock.close()
            raise
        return sock

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
