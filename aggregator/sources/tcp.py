"""What the forward input asks of an accepted TCP socket beyond the event loop's transport:
keepalive, how much is waiting unread, and a reset sent at the moment it is decided."""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import socket
import struct
import termios
from typing import Any

from aggregator.config.model import ForwardSource

_LINGER_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on, zero seconds: the final close() sends RST, not FIN."""
_LIBC = ctypes.CDLL(None, use_errno=True)
_AF_UNSPEC_ADDRESS = (ctypes.c_ubyte * 16)()
"""A ``struct sockaddr`` whose family is AF_UNSPEC (0)."""


def set_keepalive(sock: Any, settings: ForwardSource) -> None:
    if not settings.keepalive_idle:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(settings.keepalive_idle)))
    sock.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(settings.keepalive_interval))
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, settings.keepalive_probes)


def unread_bytes(sock: Any) -> int:
    """Bytes the kernel has received on ``sock`` that nobody has read yet."""
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    except OSError:
        return 0
    return count[0]


def reset_if_drained(sock: Any) -> bool:
    """Reset the connection (RST) now if nothing is waiting unread on it; False when something
    is, and the socket is left as it was but for its linger setting.

    The event loop closes an aborted transport's descriptor only on a later turn, and a close
    with SO_LINGER 0 resets the connection only then: a client write arriving in between would
    be taken by the kernel and lost. On Linux, connect() with AF_UNSPEC disconnects a TCP socket
    and resets an established connection at once, leaving the descriptor for the loop to close;
    the check and the reset are two system calls back to back. Where the disconnect is refused,
    the linger setting still makes the later close a reset. The caller aborts the transport.
    """
    _linger_reset(sock)
    if unread_bytes(sock):
        return False
    _disconnect(sock)
    return True


def reset_now(sock: Any) -> None:
    """Reset the connection (RST) now, whatever is waiting unread (see reset_if_drained)."""
    _linger_reset(sock)
    _disconnect(sock)


def _linger_reset(sock: Any) -> None:
    with contextlib.suppress(OSError):  # reset by the peer already: nothing to do
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _disconnect(sock: Any) -> None:
    _LIBC.connect(sock.fileno(), _AF_UNSPEC_ADDRESS, ctypes.sizeof(_AF_UNSPEC_ADDRESS))
