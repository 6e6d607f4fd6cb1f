"""The <security> handshake against a client that follows Fluentd's out_forward: its HELO
check, its PING (hex salt, digests in its order) and its PONG check."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.protocol.handshake import (
    Client,
    ClientHandshake,
    HandshakeError,
    Security,
    ServerHandshake,
    State,
    User,
)


def sha512_hex(*parts: str | bytes) -> str:
    digest = hashlib.sha512()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()


class OutForwardClient:
    """What out_forward's handshake does, written from its behaviour, not from our server."""

    def __init__(self, hostname: str, shared_key: str, username: str = "", password: str = ""):
        self.hostname, self.shared_key = hostname, shared_key
        self.username, self.password = username, password
        self.salt = secrets.token_hex(16)

    def ping(self, helo: bytes) -> bytes:
        kind, options = msgpack.unpackb(helo, raw=False)
        assert kind == "HELO" and options["keepalive"] is True
        self.nonce, auth = options["nonce"], options["auth"]
        assert isinstance(self.nonce, bytes) and len(self.nonce) == 16
        ping = ["PING", self.hostname, self.salt,
                sha512_hex(self.salt, self.hostname, self.nonce, self.shared_key)]  # fmt: skip
        if auth:  # in_forward always sends one: out_forward answers with username/password
            ping += [self.username, sha512_hex(auth, self.username, self.password)]
        else:
            ping += ["", ""]
        return msgpack.packb(ping)  # type: ignore[no-any-return]

    def check_pong(self, pong: bytes) -> tuple[bool, str]:
        message = msgpack.unpackb(pong, raw=False)
        if len(message) != 5 or message[0] != "PONG":
            return False, "invalid format"
        _, ok, reason, hostname, digest = message
        if not ok:
            return False, "authentication failed: " + reason
        if hostname == self.hostname:
            return False, "same hostname"
        expected = sha512_hex(self.salt, hostname, self.nonce, self.shared_key)
        return (digest == expected), ("" if digest == expected else "shared key mismatch")


def shake(security: Security, client: OutForwardClient, address: str = "10.1.2.3") -> Any:
    server = ServerHandshake(security, address)
    ping = msgpack.unpackb(client.ping(server.helo()), raw=False)
    return server, client.check_pong(server.receive(ping))


SECURITY = Security("aggregator", "s3cret")


def test_the_right_shared_key_is_welcome_and_the_pong_proves_ours() -> None:
    server, result = shake(SECURITY, OutForwardClient("app-host", "s3cret"))
    assert result == (True, "") and server.state is State.ESTABLISHED


def test_a_wrong_shared_key_is_refused_with_the_reason() -> None:
    server, result = shake(SECURITY, OutForwardClient("app-host", "guess"))
    assert result == (False, "authentication failed: shared_key mismatch")
    assert server.state is State.FAILED and server.failure == "shared_key mismatch"


def test_user_auth() -> None:
    security = Security("aggregator", "s3cret", user_auth=True,
                        users=(User("alice", "pw1"), User("bob", "pw2")))  # fmt: skip
    assert shake(security, OutForwardClient("h", "s3cret", "bob", "pw2"))[1] == (True, "")
    _, refused = shake(security, OutForwardClient("h", "s3cret", "bob", "pw1"))
    assert refused == (False, "authentication failed: username/password mismatch")
    _, nobody = shake(security, OutForwardClient("h", "s3cret"))
    assert nobody[0] is False


def test_clients_by_network_with_their_own_key_and_users() -> None:
    security = Security(
        "aggregator", "default-key", user_auth=True, allow_anonymous_source=False,
        users=(User("alice", "pw"), User("bob", "pw")),
        clients=(Client(ipaddress.ip_network("10.0.0.0/8"), "ten-key", ("alice",)),),
    )  # fmt: skip
    assert shake(security, OutForwardClient("h", "ten-key", "alice", "pw"))[1] == (True, "")
    assert shake(security, OutForwardClient("h", "default-key", "alice", "pw"))[1][0] is False
    assert shake(security, OutForwardClient("h", "ten-key", "bob", "pw"))[1][0] is False
    _, stranger = shake(security, OutForwardClient("h", "default-key", "alice", "pw"), "192.0.2.1")
    assert stranger == (False, "authentication failed: anonymous source host '192.0.2.1' denied")
    mapped = shake(security, OutForwardClient("h", "ten-key", "alice", "pw"), "::ffff:10.9.9.9")
    assert mapped[1] == (True, "")


def client_shake(security: Security, client: ClientHandshake) -> ServerHandshake:
    server = ServerHandshake(security, "10.1.2.3")
    ping = msgpack.unpackb(client.ping(msgpack.unpackb(server.helo())), raw=False)
    client.check_pong(msgpack.unpackb(server.receive(ping), raw=False))
    return server


def test_our_client_gets_in_with_the_key_and_a_user() -> None:
    security = Security("aggregator", "s3cret", user_auth=True, users=(User("bob", "pw2"),))
    server = client_shake(security, ClientHandshake("app-host", "s3cret", "bob", "pw2"))
    assert server.state is State.ESTABLISHED and server.client_hostname == "app-host"
    with pytest.raises(HandshakeError, match="refused us: username/password mismatch"):
        client_shake(security, ClientHandshake("app-host", "s3cret", "bob", "nope"))
    with pytest.raises(HandshakeError, match="refused us: shared_key mismatch"):
        client_shake(SECURITY, ClientHandshake("app-host", "guess"))


def test_our_client_pings_as_out_forward_and_checks_the_servers_proof() -> None:
    """Against a server scripted from in_forward's behaviour (no auth salt: no user)."""
    client = ClientHandshake("app-host", "s3cret")
    nonce = secrets.token_bytes(16)
    kind, hostname, salt, digest, user, password = msgpack.unpackb(
        client.ping(["HELO", {"nonce": nonce, "auth": b"", "keepalive": True}]), raw=False
    )
    assert (kind, hostname, user, password) == ("PING", "app-host", "", "")
    assert len(salt) == 32 and digest == sha512_hex(salt, "app-host", nonce, "s3cret")
    proof = sha512_hex(salt, "fluentd", nonce, "s3cret")
    client.check_pong(["PONG", True, "", "fluentd", proof])
    with pytest.raises(HandshakeError, match="shared key mismatch"):
        client.check_pong(["PONG", True, "", "fluentd", sha512_hex(salt, "fluentd", nonce, "x")])
    with pytest.raises(HandshakeError, match="a forward loop"):
        client.check_pong(["PONG", True, "", "app-host", proof])
    for bad in (["HELO"], None, ["PONG", True, "", "h", proof]):
        with pytest.raises(HandshakeError, match="expected HELO"):
            ClientHandshake("app-host", "k").ping(bad)
    with pytest.raises(HandshakeError, match="expected PONG"):
        client.check_pong({"ack": "x"})


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=7) | st.dictionaries(st.text(max_size=5),
                                                                      children, max_size=3),
    max_leaves=20,
))  # fmt: skip
def test_no_malformed_ping_gets_in_or_breaks_the_handshake(ping: Any) -> None:
    server = ServerHandshake(SECURITY, "10.1.2.3")
    pong = msgpack.unpackb(server.receive(ping), raw=False)
    assert pong[:2] == ["PONG", False] and server.state is State.FAILED
