"""``python -m benchmarks redeploy``: what a rolling redeploy loses, per client mode.

Two instances of the service share one address list, as tasks share a load balancer; clients
that behave like Docker's ``fluentd`` driver (with and without acks) send steadily. The instance
they are connected to is stopped with SIGTERM and started again, ``--stops`` times; they move to
the other one. Then every event each client wrote (and, with acks, had acknowledged) is looked
for in the Firehose emulator: lost and duplicated events are counted per mode.

``--source DIR`` runs another checkout's ``aggregator`` (say, the commit before a change), for
a before/after on the same machine. The config uses only keys every version knows, and each
version's own defaults for closing connections.
"""

from __future__ import annotations

import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson

from benchmarks.docker_client import DockerLikeClient
from benchmarks.service import Service, firehose_route, sources
from emulator import EmulatorThread

STREAM = "redeploy"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def config(forward_port: int, http_port: int, endpoint: str, max_age: str | None) -> str:
    """Only keys that every version knows, unless ``max_age`` is asked for."""
    age = f'max_connection_age = "{max_age}"\n' if max_age else ""
    return sources(forward_port, http_port, "heartbeat = false\n" + age) + "\n" + firehose_route(
        endpoint, STREAM, 'buffer = { flush_interval = "200ms" }\n'
    )


@dataclass(frozen=True)
class ModeResult:
    mode: str
    clients: int
    sent: int
    lost: int
    duplicated: int
    connections: int
    """Connections the clients opened: each one but the last ended in a server close."""


@dataclass(frozen=True)
class RedeployResult:
    stops: int
    modes: list[ModeResult]
    stop_seconds: list[float]
    exit_codes: list[int]

    def render(self) -> str:
        median = sorted(self.stop_seconds)[len(self.stop_seconds) // 2]
        rows = [
            f"stops              {self.stops} (SIGTERM to the instance the clients use)",
            f"stop duration      median {median:.2f} s, max {max(self.stop_seconds):.2f} s; "
            f"exit codes {sorted(set(self.exit_codes))}",
            f"{'mode':<10}{'clients':>8}{'sent':>9}{'lost':>7}{'dup':>6}{'lost/stop/conn':>16}"
            f"{'closes':>8}",
        ]
        for m in self.modes:
            per = m.lost / (self.stops * m.clients) if m.clients else 0.0
            rows.append(
                f"{m.mode:<10}{m.clients:>8}{m.sent:>9,}{m.lost:>7}{m.duplicated:>6}{per:>16.2f}"
                f"{m.connections - m.clients:>8,}"
            )
        return "\n".join(rows)

    @property
    def exit_status(self) -> int:
        return 1 if any(m.lost for m in self.modes) else 0


def measure(
    stops: int,
    plain_clients: int,
    acked_clients: int,
    interval: float,
    source: Path | None = None,
    max_age: str | None = None,
) -> RedeployResult:
    forward = [_free_port(), _free_port()]
    http = [_free_port(), _free_port()]
    env = {"PYTHONPATH": str(source)} if source else {}
    with EmulatorThread() as emulator, tempfile.TemporaryDirectory(prefix="bench-redeploy-") as d:
        workdir = Path(d)

        def start(i: int, generation: int) -> Service:
            path = workdir / f"{i}-{generation}"
            path.mkdir()
            text = config(forward[i], http[i], emulator.endpoint_url, max_age)
            return Service.start(text, workers=1, workdir=path, extra_env=env, cwd=source)

        running = [start(0, 0), start(1, 0)]
        clients = [DockerLikeClient(forward, f"plain{n}", interval=interval)
                   for n in range(plain_clients)]  # fmt: skip
        clients += [DockerLikeClient(forward, f"acked{n}", acks=True, interval=interval)
                    for n in range(acked_clients)]  # fmt: skip
        stop_seconds, codes = [], []
        try:
            for client in clients:
                client.start()
            for n in range(stops):
                i = n % 2
                marks = [len(c.sent) + 50 for c in clients]
                while any(len(c.sent) < m for c, m in zip(clients, marks, strict=True)):
                    time.sleep(0.05)
                started = time.monotonic()
                codes.append(running[i].stop())
                stop_seconds.append(time.monotonic() - started)
                running[i] = start(i, n + 1)
            for client in clients:
                client.stop(timeout=90)
            total = sum(len(c.sent) for c in clients)
            deadline = time.monotonic() + 60
            while len(emulator.lines(STREAM)) < total and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            for client in clients:
                client.stopping.set()
            for service in running:
                codes.append(service.stop())
        events = [orjson.loads(line) for line in emulator.lines(STREAM)]
    delivered: dict[str, Counter[int]] = {}
    for event in events:
        delivered.setdefault(event["client"], Counter())[event["id"]] += 1
    modes = []
    for mode in ("plain", "acked"):
        ours = [c for c in clients if c.client.startswith(mode)]
        lost = dup = 0
        for c in ours:
            got = delivered.get(c.client, Counter())
            lost += len(set(c.sent) - set(got))
            dup += sum(n - 1 for n in got.values() if n > 1)
        modes.append(ModeResult(mode, len(ours), sum(len(c.sent) for c in ours), lost, dup,
                                sum(c.connections for c in ours)))  # fmt: skip
    return RedeployResult(stops, modes, stop_seconds, codes)
