"""Inputs: one module per source type."""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Listener:
    """The sockets one source listens on in one worker, bound by the supervisor: TCP, and UDP
    for forward heartbeats."""

    tcp: socket.socket
    udp: socket.socket | None = None
