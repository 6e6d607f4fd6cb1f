"""Forward-protocol clients that behave like the real ones, for measuring and testing stops.

:class:`DockerLikeClient` does what Docker's ``fluentd`` log driver (fluent-logger-golang) does:
one message per write, and a message is sent again, on a new connection, only when its own
write failed. Without acks it never reads its socket; with acks (``fluentd-request-ack``) it
waits for each message's ack and sends the message again when the connection ends first.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence

import msgpack

from aggregator.protocol import encode_message, new_chunk_id

ACK_TIMEOUT = 5.0
GIVE_UP_AFTER = 60.0
"""A message that cannot be written for this long is counted as failed, not retried forever."""


class DockerLikeClient(threading.Thread):
    def __init__(
        self,
        ports: Sequence[int] | Callable[[], Sequence[int]],
        name: str,
        *,
        acks: bool = False,
        interval: float = 0.005,
        count: int | None = None,
        pad: int = 0,
    ) -> None:
        super().__init__(daemon=True, name=name)
        self._ports = ports
        self.client = name
        self.acks = acks
        self.interval = interval
        self.count = count
        self.pad = "x" * pad
        """Filler in each record, to make events of a given size."""
        self.sent: list[int] = []
        """Ids whose write (and ack, with acks) succeeded."""
        self.failed: list[int] = []
        self.reconnects = 0
        self.connections = 0
        self.stopping = threading.Event()
        self._sock: socket.socket | None = None
        self._next_port = 0

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        self.join(timeout)
        assert not self.is_alive(), f"{self.client} did not stop"

    def run(self) -> None:
        i = 0
        while not self.stopping.is_set() and (self.count is None or i < self.count):
            chunk = new_chunk_id() if self.acks else None
            record = {"id": i, "client": self.client, **({"pad": self.pad} if self.pad else {})}
            message = encode_message("docker." + self.client, time.time(), record, chunk=chunk)
            if self._send(message, chunk):
                self.sent.append(i)
            else:
                self.failed.append(i)
            i += 1
            time.sleep(self.interval)
        if self._sock is not None:
            self._sock.close()

    def _send(self, message: bytes, chunk: str | None) -> bool:
        give_up = time.monotonic() + GIVE_UP_AFTER
        while time.monotonic() < give_up:
            sock = self._sock or self._connect(give_up)
            if sock is None:
                return False
            try:
                sock.sendall(message)
                if chunk is not None:
                    self._wait_for_ack(sock, chunk)
                return True
            except OSError:  # reset, broken pipe, closed before the ack: a new connection
                sock.close()
                self._sock = None
                self.reconnects += 1
        return False

    def _wait_for_ack(self, sock: socket.socket, chunk: str) -> None:
        sock.settimeout(ACK_TIMEOUT)
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            data = sock.recv(4096)
            if not data:
                raise ConnectionResetError("closed before the ack")
            unpacker.feed(data)
            for reply in unpacker:
                if reply.get("ack") == chunk:
                    return

    def _connect(self, give_up: float) -> socket.socket | None:
        while time.monotonic() < give_up:
            ports = list(self._ports() if callable(self._ports) else self._ports)
            for _ in range(len(ports)):
                port = ports[self._next_port % len(ports)]
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=ACK_TIMEOUT)
                except OSError:
                    self._next_port += 1
                    continue
                self._sock = sock
                self.connections += 1
                return sock
            time.sleep(0.01)
        return None
