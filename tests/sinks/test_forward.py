"""The forward sink against scripted servers that behave like in_forward (or break like one):
messages by tag with their times, acks, a server that acks some messages only, one that never
answers, servers chosen by weight and standby, stale kept-alive connections."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from aggregator.config.model import ForwardDestination, Inject
from aggregator.formatting import ForwardFormatter
from aggregator.sinks.base import DELIVERED, RetryableError
from aggregator.sinks.forward import ForwardSink

Reply = Callable[[list[Any]], bool]
"""Whether the server acks this message."""


class Server:
    """An in_forward stand-in: reads PackedForward messages, keeps them, acks as told."""

    def __init__(self, ack: Reply = lambda message: True, close_after: int | None = None) -> None:
        self.ack, self.close_after = ack, close_after
        self.messages: list[list[Any]] = []
        self.connections = 0

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        unpacker = msgpack.Unpacker(raw=False)
        while data := await reader.read(65536):
            unpacker.feed(data)
            for message in unpacker:
                self.messages.append(message)
                if self.ack(message) and "chunk" in message[2]:
                    writer.write(msgpack.packb({"ack": message[2]["chunk"]}))
                if self.close_after is not None and len(self.messages) >= self.close_after:
                    writer.close()
                    return
        writer.close()

    def events(self) -> list[tuple[str, Any, Any]]:
        out = []
        for tag, payload, options in self.messages:
            if options.get("compressed") == "gzip":
                payload = gzip.decompress(payload)
            unpacker = msgpack.Unpacker(raw=False, ext_hook=lambda code, data: (code, data))
            unpacker.feed(payload)
            out += [(tag, t, record) for t, record in unpacker]
        return out


def sink(*servers: dict[str, Any], **settings: Any) -> ForwardSink:
    settings = {"type": "forward", "servers": list(servers), "connect_timeout": 1, **settings}
    return ForwardSink("fwd", ForwardDestination.model_validate(settings))


def lines(tag: str, n: int, start: int = 0) -> list[bytes]:
    entries = [[1700000000 + i, {"id": i}] for i in range(start, start + n)]
    return ForwardFormatter(Inject()).encode(tag, entries).lines


def test_messages_go_by_tag_with_their_times_and_a_chunk_is_delivered_when_acked() -> None:
    async def main() -> None:
        async with Server() as server:
            s = sink({"host": "127.0.0.1", "port": server.port}, require_ack_response=True,
                     compress="gzip")  # fmt: skip
            result = await s.write(lines("a", 1500) + lines("b", 2, 1500) + lines("a", 1, 1502))
            assert result is DELIVERED
            await s.close()
            # at most 1000 events a message; a new message where the tag changes
            assert [(m[0], m[2]["size"]) for m in server.messages] == [
                ("a", 1000), ("a", 500), ("b", 2), ("a", 1)]  # fmt: skip
            events = server.events()
            assert [r["id"] for _, _, r in events] == list(range(1503))
            assert events[7][1] == (0, b"\x65\x53\xf1\x07\x00\x00\x00\x00")  # EventTime, exact

    asyncio.run(main())


def test_only_the_messages_not_acked_are_retried() -> None:
    async def main() -> None:
        async with Server(ack=lambda m: m[0] != "b", close_after=3) as server:
            s = sink({"host": "127.0.0.1", "port": server.port}, require_ack_response=True)
            result = await s.write(lines("a", 2) + lines("b", 3, 2) + lines("c", 1, 5))
            assert result.retry == lines("b", 3, 2)

    asyncio.run(main())


def test_no_ack_in_time_is_a_retryable_failure_and_without_acks_written_is_delivered() -> None:
    async def main() -> None:
        async with Server(ack=lambda m: False) as server:
            address = {"host": "127.0.0.1", "port": server.port}
            s = sink(address, require_ack_response=True, ack_response_timeout=0.3)
            with pytest.raises(RetryableError, match="no server took the chunk"):
                await s.write(lines("a", 3))
            assert await sink(address).write(lines("a", 3)) is DELIVERED

    asyncio.run(main())


def test_a_server_down_gives_way_to_the_others_then_standbys() -> None:
    async def main() -> None:
        async with Server() as regular, Server() as standby:
            with_standby = sink(
                {"host": "127.0.0.1", "port": 1, "weight": 100},  # nothing listens on port 1
                {"host": "127.0.0.1", "port": standby.port, "standby": True},
                {"host": "127.0.0.1", "port": regular.port, "weight": 1},
                recover_wait=60, require_ack_response=True,
            )  # fmt: skip
            for i in range(5):
                assert await with_standby.write(lines("a", 1, i)) is DELIVERED
            # the weightier server failed once, then was skipped; the standby never needed
            assert len(regular.messages) == 5 and standby.messages == []
            only_standby = sink({"host": "127.0.0.1", "port": 1},
                                {"host": "127.0.0.1", "port": standby.port, "standby": True},
                                require_ack_response=True)
            assert await only_standby.write(lines("a", 1)) is DELIVERED
            assert len(standby.messages) == 1

    asyncio.run(main())


def test_a_kept_alive_connection_the_server_closed_is_not_written_to() -> None:
    async def main() -> None:
        async with Server(close_after=1) as server:
            s = sink({"host": "127.0.0.1", "port": server.port}, keepalive=True)
            assert await s.write(lines("a", 1)) is DELIVERED
            await asyncio.sleep(0.2)  # the server's FIN arrives
            assert await s.write(lines("a", 1, 1)) is DELIVERED
            await asyncio.sleep(0.2)
            assert server.connections == 2 and len(server.messages) == 2
            await s.close()

    asyncio.run(main())
