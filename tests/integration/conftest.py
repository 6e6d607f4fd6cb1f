"""The real ``aggregator run`` process, started on free ports with a config a test writes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    """A port free for TCP and UDP at the time of asking."""
    while True:
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


@dataclass
class Aggregator:
    proc: subprocess.Popen[bytes]
    forward_port: int
    http_port: int
    data_dir: Path
    log_path: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.forward_port), timeout=timeout)
        return sock

    def logs(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                entries.append({"message": line, "level": "raw"})
        return entries

    def worker_pids(self) -> set[int]:
        """The supervisor's live worker processes."""
        pid = self.proc.pid
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def health(self, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        """GET /api/health: status and body; (0, {}) when no answer came within ``timeout``
        (a connection the kernel hands to a missing worker's socket waits for its restart)."""
        try:
            with urllib.request.urlopen(self.http + "/api/health", timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())
        except (TimeoutError, urllib.error.URLError):
            return 0, {}

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``, from
        GET /metrics (0 when there are none)."""
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )


def read_ndjson(directory: Path, pattern: str = "*.ndjson*") -> list[dict[str, Any]]:
    """Every event in the file destination's directory, complete and in-progress files."""
    events = []
    for path in sorted(directory.glob(pattern)):
        events += [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
    return events


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


StartAggregator = Callable[..., Aggregator]
SUPERVISOR_READY = '"worker":"supervisor","message":"ready"'  # every worker is serving


@pytest.fixture
def start_aggregator(tmp_path: Path) -> Iterator[StartAggregator]:
    """``start(config_toml)``: runs the aggregator on that config, where ``{forward_port}``,
    ``{http_port}`` and ``{data_dir}`` are replaced; waits until it is ready. ``suffix``
    ".conf" makes it a fluent.conf."""
    started: list[Aggregator] = []

    def start(
        config: str,
        env: dict[str, str] | None = None,
        ready_timeout: float = 20.0,
        own_process_group: bool = False,
        suffix: str = ".toml",
    ) -> Aggregator:
        n = len(started)
        forward_port, http_port = free_port(), free_port()
        data_dir = tmp_path / f"data{n}"
        path = tmp_path / f"aggregator{n}{suffix}"
        for key, value in (("forward_port", forward_port), ("http_port", http_port),
                           ("data_dir", data_dir)):  # fmt: skip
            config = config.replace("{" + key + "}", str(value))
        path.write_text(config)
        log_path = tmp_path / f"aggregator{n}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "aggregator", "run", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=log_path.open("wb"),
            env={**os.environ, **(env or {})},
            process_group=0 if own_process_group else None,
        )
        agg = Aggregator(proc, forward_port, http_port, data_dir, log_path)
        started.append(agg)
        ready = wait_for(
            lambda: proc.poll() is not None or SUPERVISOR_READY in log_path.read_text(),
            ready_timeout,
        )
        if not ready or proc.poll() is not None:
            raise RuntimeError(f"aggregator did not start:\n{log_path.read_text()}")
        return agg

    yield start
    for agg in started:
        if agg.proc.poll() is None:
            agg.proc.kill()
            agg.proc.wait()


def server_block(workers: int = 1, stop_timeout: str = "20s", handoff: int | None = None) -> str:
    """A ``[server]`` table that stops fast: short drain periods, ``stop_timeout``, and a
    hand-off to a forward port on 127.0.0.1 when ``handoff`` is given."""
    handoff_line = f'handoff = "127.0.0.1:{handoff}"' if handoff else ""
    return f"""
[server]
workers = {workers}
drain_quiet_period = "100ms"
drain_timeout = "2s"
stop_timeout = "{stop_timeout}"
{handoff_line}
"""


BASE_CONFIG = """
[server]
workers = 2
drain_quiet_period = "100ms"
drain_timeout = "2s"
stop_timeout = "20s"

[[sources]]
type = "forward"
bind = "127.0.0.1"
port = {forward_port}

[[sources]]
type = "http"
bind = "127.0.0.1"
port = {http_port}
"""

FILE_CONFIG = (
    BASE_CONFIG
    + """
[[routes]]
match = "health*"
destination = "discard"

[[routes]]
match = "**"
destination = "local"

[destinations.discard]
type = "null"

[destinations.local]
type = "file"
path = "{data_dir}"
inject = { tag_key = "tag", time_key = "time", time_format = "epoch" }
buffer = { flush_interval = "100ms" }
"""
)


def _fluentd_bin() -> Path:
    """``$FLUENTD_BIN``, else ``shared/peers/fluentd/bin/fluentd`` in the nearest directory
    above this checkout that has one."""
    if given := os.environ.get("FLUENTD_BIN"):
        return Path(given)
    here = Path(__file__).resolve()
    candidates = [p / "shared" / "peers" / "fluentd" / "bin" / "fluentd" for p in here.parents]
    return next((c for c in candidates if c.exists()), candidates[3])


FLUENTD = _fluentd_bin()
"""Fluentd 1.16 with the Kinesis plugin and fluent-plugin-concat, beside this checkout (the
Makefile installs its Debian packages)."""


def _fluentd_runs() -> bool:
    if not FLUENTD.exists():
        return False
    try:
        return subprocess.run([str(FLUENTD), "--version"], capture_output=True,
                              timeout=30).returncode == 0  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_fluentd = pytest.mark.skipif(not _fluentd_runs(), reason=f"no Fluentd at {FLUENTD}")

StartFluentd = Callable[[Path, dict[str, str]], int]


@pytest.fixture
def fluentd(tmp_path: Path) -> Iterator[StartFluentd]:
    """Starts Fluentd on a fluent.conf whose forward source's port is "#{ENV['FORWARD_PORT']}";
    returns that port once it listens."""
    started: list[subprocess.Popen[bytes]] = []

    def start(conf: Path, env: dict[str, str]) -> int:
        port = free_port()
        log = tmp_path / f"fluentd-{len(started)}.log"
        proc = subprocess.Popen(
            [str(FLUENTD), "-c", str(conf), "--no-supervisor"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
            env={**os.environ, **env, "FORWARD_PORT": str(port)},
        )  # fmt: skip
        started.append(proc)
        assert wait_for(lambda: proc.poll() is not None or _listening(port), 60), log.read_text()
        assert proc.poll() is None, log.read_text()
        return port

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False
