"""The forward protocol's ``<security>`` handshake, both sides, sans-IO.

The server side as Fluentd's in_forward does it, so that its out_forward (and Fluent Bit's
forward output) can authenticate to us; the client side as out_forward does it, so that the
forward destination and the hand-off can authenticate to them (and to us)::

    server → HELO  ["HELO", {"nonce": 16 bytes, "auth": 16 bytes, "keepalive": true}]
    client → PING  ["PING", hostname, salt, sha512_hex(salt + hostname + nonce + shared_key),
                    username, sha512_hex(auth + username + password)]
    server → PONG  ["PONG", true, "", self_hostname,
                    sha512_hex(salt + self_hostname + nonce + shared_key)]
                or ["PONG", false, reason, "", ""], then the server closes

The client's username and password are checked only with ``user_auth``; ``clients`` narrow who
may connect (by address or network) and may give each its own shared key and users. Only after
a good PING does the connection carry events. Bytes in: raw decoded objects; bytes out: the
replies; nothing here touches sockets or clocks. The client checks the server's PONG in turn:
its digest proves that the server knows the shared key too.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

NONCE_BYTES = 16


@dataclass(frozen=True, slots=True)
class User:
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class Client:
    """Clients from ``network`` (an address or a CIDR network)."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    shared_key: str | None = None
    users: tuple[str, ...] = ()
    """Usernames this client may use (empty: any configured user)."""


@dataclass(frozen=True, slots=True)
class Security:
    self_hostname: str
    shared_key: str
    user_auth: bool = False
    allow_anonymous_source: bool = True
    users: tuple[User, ...] = ()
    clients: tuple[Client, ...] = ()

    def client_for(self, address: str) -> Client | None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return next((c for c in self.clients if ip in c.network), None)


class State(enum.Enum):
    PINGPONG = "pingpong"  # HELO sent, waiting for the PING
    ESTABLISHED = "established"
    FAILED = "failed"


def _sha512_hex(*parts: str | bytes) -> str:
    digest = hashlib.sha512()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape") if isinstance(part, str) else part)
    return digest.hexdigest()


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value if isinstance(value, str) else None


class ServerHandshake:
    """One connection's handshake. Send :meth:`helo` first; feed each decoded object to
    :meth:`receive` until :attr:`state` is ESTABLISHED (then the stream carries events) or
    FAILED (then close after sending the reply)."""

    def __init__(
        self,
        security: Security,
        remote_address: str,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._security = security
        self._remote = remote_address
        self._nonce = random_bytes(NONCE_BYTES)
        self._auth_salt = random_bytes(NONCE_BYTES)
        self.state = State.PINGPONG
        self.failure: str | None = None
        """Why the client was refused (for the log)."""
        self.client_hostname: str | None = None

    @property
    def failed(self) -> bool:
        return self.state is State.FAILED

    def helo(self) -> bytes:
        return _pack(["HELO", {"nonce": self._nonce, "auth": self._auth_salt, "keepalive": True}])

    def receive(self, message: Any) -> bytes:
        """The reply to the client's PING: a PONG either way."""
        if self.state is not State.PINGPONG:
            raise RuntimeError(f"no handshake message is expected in state {self.state}")
        ok, reason_or_salt, shared_key = self._check_ping(message)
        if not ok:
            self.state = State.FAILED
            self.failure = reason_or_salt
            return _pack(["PONG", False, reason_or_salt, "", ""])
        self.state = State.ESTABLISHED
        hostname = self._security.self_hostname
        digest = _sha512_hex(reason_or_salt, hostname, self._nonce, shared_key)
        return _pack(["PONG", True, "", hostname, digest])

    def _check_ping(self, message: Any) -> tuple[bool, str, str]:
        if not (isinstance(message, list | tuple) and len(message) == 6):
            return False, "invalid ping message", ""
        parts: Sequence[str | None] = [_text(part) for part in message]
        if parts[0] != "PING" or any(part is None for part in parts):
            return False, "invalid ping message", ""
        _, hostname, salt, key_digest, username, password_digest = (str(p) for p in parts)
        self.client_hostname = hostname
        security = self._security
        client = security.client_for(self._remote)
        if client is None and not security.allow_anonymous_source:
            return False, f"anonymous source host '{self._remote}' denied", ""
        shared_key = client.shared_key if client and client.shared_key else security.shared_key
        expected = _sha512_hex(salt, hostname, self._nonce, shared_key)
        if not hmac.compare_digest(key_digest.encode(), expected.encode()):
            return False, "shared_key mismatch", ""
        if security.user_auth and not self._password_matches(client, username, password_digest):
            return False, "username/password mismatch", ""
        return True, salt, shared_key

    def _password_matches(self, client: Client | None, username: str, digest: str) -> bool:
        allowed = client.users if client is not None else ()
        for user in self._security.users:
            if user.username != username or (allowed and username not in allowed):
                continue
            expected = _sha512_hex(self._auth_salt, username, user.password)
            if hmac.compare_digest(digest.encode(), expected.encode()):
                return True
        return False


class HandshakeError(ValueError):
    """The server refused us, or answered what a Fluentd server would not."""


class ClientHandshake:
    """The client's side: feed the server's HELO to :meth:`ping` and send what it returns,
    then feed the PONG to :meth:`check_pong`. Both raise :class:`HandshakeError`."""

    def __init__(
        self,
        self_hostname: str,
        shared_key: str,
        username: str = "",
        password: str = "",
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._hostname = self_hostname
        self._shared_key = shared_key
        self._username = username
        self._password = password
        self._salt = random_bytes(NONCE_BYTES).hex()  # as out_forward: 32 hex characters
        self._nonce: bytes | str = b""

    def ping(self, helo: Any) -> bytes:
        if not (isinstance(helo, list | tuple) and len(helo) == 2 and _text(helo[0]) == "HELO"):
            raise HandshakeError(f"expected HELO from the server, got {helo!r:.100}")
        options = helo[1] if isinstance(helo[1], dict) else {}
        self._nonce = options.get("nonce") or b""
        auth = options.get("auth") or b""
        digest = _sha512_hex(self._salt, self._hostname, self._nonce, self._shared_key)
        ping: list[Any] = ["PING", self._hostname, self._salt, digest, "", ""]
        if auth:  # the server asks every client for a user (in_forward's user_auth salt)
            ping[4:] = [self._username, _sha512_hex(auth, self._username, self._password)]
        return _pack(ping)

    def check_pong(self, pong: Any) -> None:
        if not (isinstance(pong, list | tuple) and len(pong) == 5 and _text(pong[0]) == "PONG"):
            raise HandshakeError(f"expected PONG from the server, got {pong!r:.100}")
        _, ok, reason, hostname, digest = pong
        if ok is not True:
            why = _text(reason) or repr(reason)
            raise HandshakeError(f"the server refused us: {why[:200]}")
        hostname = _text(hostname) or ""
        if hostname == self._hostname:
            raise HandshakeError(f"the server's self_hostname is ours too ({hostname!r}): a "
                                 "forward loop, or two ends configured alike")  # fmt: skip
        expected = _sha512_hex(self._salt, hostname, self._nonce, self._shared_key)
        if not hmac.compare_digest((_text(digest) or "").encode(), expected.encode()):
            raise HandshakeError("the server's PONG does not prove the shared key: shared key "
                                 "mismatch")  # fmt: skip


def _pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed
