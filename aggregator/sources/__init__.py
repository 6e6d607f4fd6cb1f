"""Inputs: one module per source type, each behind the :class:`Source` interface."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from aggregator.config.model import ForwardSource, HttpSource, Server

if TYPE_CHECKING:
    from aggregator.config.model import Source as SourceSettings
    from aggregator.pipeline import Pipeline


@dataclass(frozen=True, slots=True)
class Listener:
    """The sockets one source listens on in one worker, bound by the supervisor: TCP, and UDP
    for forward heartbeats."""

    tcp: socket.socket
    udp: socket.socket | None = None


class Source(Protocol):
    """What a worker does with an input: start it, and stop it in two steps."""

    @property
    def name(self) -> str: ...

    @property
    def port(self) -> int:
        """The TCP port it listens on (once started)."""

    async def start(self, listener: Listener | None = None) -> None:
        """Listen on ``listener`` (bound by the supervisor), or bind its own address."""

    def stop_accepting(self) -> None:
        """No new connections or requests from now on."""

    async def drain(self, until: float) -> None:
        """Let open connections finish at their safe moment; close what is still open at
        ``until`` (a time.monotonic() time)."""


def build_source(settings: SourceSettings, pipeline: Pipeline, server: Server) -> Source:
    """The source for one ``[[sources]]`` entry of one worker."""
    if isinstance(settings, ForwardSource):
        from aggregator.sources.forward import ForwardServer

        return ForwardServer(settings, pipeline, server)
    if isinstance(settings, HttpSource):
        from aggregator.sources.http import HttpServer

        return HttpServer(settings, pipeline, server)
    raise TypeError(f"no source for {type(settings).__name__}")
