"""The forward client, with real processes: the forward destination into Fluentd's own in_forward
(TLS, the ``<security>`` handshake with a user, acks, gzip) and into another aggregator (a
server down, then up), and the hand-off into a port that requires a shared key, a user and
TLS."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

import msgpack
import orjson

from aggregator.protocol import EventTime, encode_forward, new_chunk_id
from aggregator.protocol.handshake import ClientHandshake
from emulator import EmulatorThread
from tests.integration.conftest import (
    StartAggregator,
    StartFluentd,
    free_port,
    needs_fluentd,
    server_block,
    wait_for,
)
from tests.integration.test_firehose import firehose_destination, routes

KEY = "forward-s3cret"
SECURED = (
    '\nsecurity = {{ self_hostname = "{name}", shared_key = "' + KEY + '", user_auth = true, '
    'users = [{{ username = "app", password = "pw" }}] }}\n'
    'tls = {{ cert_path = "{cert}", private_key_path = "{key}" }}\n'
)
"""A forward source's security and TLS (str.format: name, cert, key)."""


def forward_source(port: str = "{forward_port}", secured: str = "") -> str:
    return f'\n[[sources]]\ntype = "forward"\nbind = "127.0.0.1"\nport = {port}\n{secured}'


def to_firehose(endpoint: str, stream: str) -> str:
    return routes(("**", "fh")) + firehose_destination("fh", endpoint, stream, secondary=None)


def to_forward(servers: str, **settings: str) -> str:
    """Every event to a forward destination ``tier2``; ``settings``: TOML values by key."""
    lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
    return routes(("**", "tier2")) + f"""
[destinations.tier2]
type = "forward"
require_ack_response = true
servers = [{servers}]
{lines}"""


def events(ids: range) -> list[list[Any]]:
    return [[EventTime(1700000000 + i, 123456789), {"id": i, "log": f"event {i} ✓"}]
            for i in ids]  # fmt: skip


def send(sock: socket.socket | ssl.SSLSocket, tag: str, ids: range, per_message: int = 100) -> None:
    """Forward mode with acks, every message acknowledged before this returns."""
    unpacker = msgpack.Unpacker(raw=False)
    for start in range(ids.start, ids.stop, per_message):
        chunk = new_chunk_id()
        sock.sendall(encode_forward(tag, events(range(start, min(start + per_message, ids.stop))),
                                    chunk=chunk))  # fmt: skip
        while not any(reply.get("ack") == chunk for reply in unpacker):
            data = sock.recv(65536)
            assert data, "closed before the ack"
            unpacker.feed(data)


def secured_socket(port: int, cert: Path) -> ssl.SSLSocket:
    """A client as out_forward: TLS, then the handshake with the key and the user."""
    context = ssl.create_default_context(cafile=str(cert))
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                               server_hostname="127.0.0.1")  # fmt: skip
    unpacker = msgpack.Unpacker(raw=False)

    def reply() -> Any:
        while True:
            for message in unpacker:
                return message
            unpacker.feed(sock.recv(65536))

    handshake = ClientHandshake("test-client", KEY, "app", "pw")
    sock.sendall(handshake.ping(reply()))
    handshake.check_pong(reply())
    return sock


def records(emulator: EmulatorThread, stream: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in emulator.lines(stream)]


@needs_fluentd
def test_the_forward_destination_delivers_into_fluentd_with_tls_a_user_acks_and_gzip(
    tmp_path: Path, emulator: EmulatorThread, fluentd: StartFluentd,
    start_aggregator: StartAggregator, certificate: tuple[Path, Path],
) -> None:  # fmt: skip
    cert, key = certificate
    conf = tmp_path / "fluent.conf"
    conf.write_text(f"""
<source>
  @type forward
  port "#{{ENV['FORWARD_PORT']}}"
  bind 127.0.0.1
  <transport tls>
    cert_path {cert}
    private_key_path {key}
  </transport>
  <security>
    self_hostname fluentd-tier
    shared_key {KEY}
    user_auth true
    <user>
      username app
      password pw
    </user>
  </security>
</source>
<match **>
  @type kinesis_firehose
  region us-east-1
  endpoint "#{{ENV['FIREHOSE_ENDPOINT']}}"
  delivery_stream_name fluentd
  <inject>
    tag_key tag
    time_key time
    time_type string
    time_format %s.%N
  </inject>
  <buffer>
    flush_interval 1s
  </buffer>
</match>
<label @FLUENT_LOG>
  <match **>
    @type null
  </match>
</label>
""")
    port = fluentd(conf, {"FIREHOSE_ENDPOINT": emulator.endpoint_url, "AWS_ACCESS_KEY_ID": "x",
                          "AWS_SECRET_ACCESS_KEY": "y"})  # fmt: skip
    ours = start_aggregator(server_block() + forward_source() + to_forward(
        f'{{ host = "127.0.0.1", port = {port}, username = "app", password = "pw" }}',
        compress='"gzip"',
        security=f'{{ self_hostname = "aggregator-tier", shared_key = "{KEY}" }}',
        tls=f'{{ ca_path = "{cert}" }}',
        buffer='{ flush_interval = "200ms", chunk_limit_records = 700 }',
    ))  # fmt: skip
    with ours.connect() as sock:
        send(sock, "app.web", range(3000))
    assert wait_for(lambda: len(emulator.lines("fluentd")) >= 3000, 30), ours.logs()[-5:]
    got = records(emulator, "fluentd")
    assert sorted(r["id"] for r in got) == list(range(3000))
    sample = next(r for r in got if r["id"] == 42)
    # tag, record and the time to the nanosecond, as they came
    assert sample == {"id": 42, "log": "event 42 ✓", "tag": "app.web",
                      "time": "1700000042.123456789"}  # fmt: skip
    assert ours.stop() == 0


def test_the_forward_destination_fails_over_and_its_server_takes_a_secured_port(
    tmp_path: Path, emulator: EmulatorThread, start_aggregator: StartAggregator,
    certificate: tuple[Path, Path],
) -> None:  # fmt: skip
    cert, key = certificate
    secured = SECURED.format(name="tier2", cert=cert, key=key)
    tier2 = start_aggregator(server_block() + forward_source(secured=secured)
                             + to_firehose(emulator.endpoint_url, "tier2"))  # fmt: skip
    down = free_port()
    tier1 = start_aggregator(server_block() + forward_source() + to_forward(
        f'{{ host = "127.0.0.1", port = {down}, weight = 1000 }}, '
        f'{{ host = "127.0.0.1", port = {tier2.forward_port}, weight = 1 }}',
        keepalive="true",
        security=f'{{ self_hostname = "tier1", shared_key = "{KEY}", username = "app", '
                 'password = "pw" }',
        tls=f'{{ ca_path = "{cert}" }}',
        buffer='{ flush_interval = "100ms", retry_wait = "50ms" }',
    ))  # fmt: skip
    with tier1.connect() as sock:
        send(sock, "app.api", range(2000))
    assert wait_for(lambda: len(emulator.lines("tier2")) >= 2000, 30), tier1.logs()[-5:]
    assert sorted(r["id"] for r in records(emulator, "tier2")) == list(range(2000))
    failed = [e for e in tier1.logs() if e["message"] == "forward server failed: trying the others"]
    assert failed and failed[0]["server"] == f"127.0.0.1:{down}"
    assert tier1.stop() == 0 and tier2.stop() == 0


def test_a_hand_off_into_a_port_that_requires_a_key_a_user_and_tls_delivers(
    emulator: EmulatorThread, start_aggregator: StartAggregator, certificate: tuple[Path, Path],
) -> None:  # fmt: skip
    """Both instances run the same settings, as tasks of one service: a secured forward port
    (for out_forward and Fluent Bit) and a plain one (for Docker's driver). The stopping one
    cannot reach Firehose; its hand-off speaks the handshake and TLS of its own secured port."""
    cert, key = certificate
    secured = SECURED.format(name="aggregator", cert=cert, key=key)
    peer = start_aggregator(server_block() + forward_source(secured=secured)
                            + forward_source(str(free_port()))
                            + to_firehose(emulator.endpoint_url, "logs"))  # fmt: skip
    unreachable = f"http://127.0.0.1:{free_port()}"
    server = server_block(workers=2, stop_timeout="8s", handoff=peer.forward_port)
    stopping = start_aggregator(server + forward_source(str(free_port()), secured=secured)
                                + forward_source()  # the plain port the test sends to
                                + to_firehose(unreachable, "logs"))  # fmt: skip
    with stopping.connect() as sock:
        send(sock, "app.pay", range(5000))
    with secured_socket(peer.forward_port, cert) as sock:  # the peer's port is secured indeed
        send(sock, "app.direct", range(5000, 5010))
    started = time.monotonic()
    assert stopping.stop(timeout=30) == 0
    assert time.monotonic() - started < 8
    assert wait_for(lambda: len(emulator.lines("logs")) >= 5010, 20)
    assert sorted(r["id"] for r in records(emulator, "logs")) == list(range(5010))
    summary = [e for e in stopping.logs() if e["message"].startswith("stopped")][-1]
    assert summary["handed_off"] == 5000
    assert peer.stop() == 0
