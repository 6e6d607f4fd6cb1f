"""The aggregator under test: its config file, its processes, and what it reports about itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import procfs
from benchmarks.config import RunConfig

STREAM = "bench"
READY = '"worker":"supervisor","message":"ready"'


def sources(forward_port: int = 0, http_port: int = 0, forward_extra: str = "") -> str:
    """Forward and HTTP inputs on 127.0.0.1; with ports 0, the supervisor's ready line says
    which ports it got."""
    return f"""\
[[sources]]
type = "forward"
bind = "127.0.0.1"
port = {forward_port}
{forward_extra}
[[sources]]
type = "http"
bind = "127.0.0.1"
port = {http_port}
"""


SOURCES = sources()


def firehose_route(endpoint_url: str, stream: str = STREAM, settings: str = "") -> str:
    """Every event to one Firehose destination ``fh``; ``settings``: more of its TOML lines."""
    return f"""\
[[routes]]
match = "**"
destination = "fh"

[destinations.fh]
type = "firehose"
delivery_stream = "{stream}"
region = "us-east-1"
endpoint_url = "{endpoint_url}"
{settings}"""


def render_config(config: RunConfig, endpoint_url: str, workdir: Path | None = None) -> str:
    """The aggregator's TOML for a run: every event to one Firehose stream at ``endpoint_url``
    (a file buffer goes under ``workdir``)."""
    on_disk = ""
    if config.buffer == "file":
        assert workdir is not None
        on_disk = f'type = "file"\npath = "{workdir / "buffer"}"\n'
    settings = f"""\
aggregate = {"true" if config.aggregate else "false"}
request_timeout = "{request_timeout(config):g}s"

[destinations.fh.buffer]
{on_disk}flush_interval = "{config.flush_interval}"
chunk_limit_size = "{config.chunk_limit}"
total_limit_size = "{config.total_limit}"
flush_thread_count = {config.flush_threads}
"""
    limits = ""
    if config.limits:  # every tenant counted, none ever limited
        limits = '\n[limits]\nrate = "100GiB/s"\nburst = "100GiB"\nbuffer_share = 1.0\n'
    limits += "".join(FILTERS[kind] for kind in config.filters)
    return f"""\
[server]
workers = {config.workers}
log_level = "info"
drain_quiet_period = "200ms"
drain_timeout = "5s"
stop_timeout = "60s"

{sources(forward_extra=f'trickle_read_delay = "{config.trickle_read_delay}"')}
{firehose_route(endpoint_url, settings=settings)}{limits}"""


FILTERS = {
    # The checks a typical config makes: a stream kept, debug lines dropped (none are).
    "grep": """
[[filters]]
type = "grep"
match = "**"
regexp = [{ key = "source", pattern = "/^std(out|err)$/" }]
exclude = [{ key = "log", pattern = "/^DEBUG /" }]
""",
    # Fields from the tag and from the record, a few bytes each (a bigger record costs more
    # downstream, which is not the filter's cost).
    "record_transformer": """
[[filters]]
type = "record_transformer"
match = "**"
record = { service = "${tag_parts[1]}", cluster = "bench", stream = '${record["source"]}' }
""",
    # The log line's time stamp taken out into a field of its own, the line kept.
    "parser": """
[[filters]]
type = "parser"
match = "**"
key_name = "log"
reserve_data = true
parse = { type = "regexp", expression = '/^(?<stamp>\\d+) /' }
""",
    # What the shipped configs do: no event here is a part, each is looked at.
    "docker_partials": """
[[filters]]
type = "docker_partials"
match = "**"
""",
}
"""Each keeps every event, so that a run still checks that all of them arrived."""


def request_timeout(config: RunConfig) -> float:
    """Longer than any stall: a call given up on while the sink holds it would be sent again
    and then counted twice (at-least-once delivery), which is not what a stall run measures."""
    return max(30.0, (config.stall_for or 0.0) + 30.0)


def service_env() -> dict[str, str]:
    """Fake credentials, and nothing of the user's AWS setup that could redirect the calls."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    return env


@dataclass
class Service:
    """A running ``aggregator run``: a supervisor and its worker processes."""

    proc: subprocess.Popen[bytes]
    forward_port: int
    http_port: int
    log_path: Path

    @classmethod
    def start(
        cls,
        config_text: str,
        workers: int,
        workdir: Path,
        ready_timeout: float = 30.0,
        extra_env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Service:
        """Start ``aggregator run`` on ``config_text``; ``cwd``: where ``python -m aggregator``
        looks first for the package (another checkout, with PYTHONPATH in ``extra_env``)."""
        config_path = workdir / "aggregator.toml"
        config_path.write_text(config_text)
        log_path = workdir / "aggregator.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "aggregator",
                    "run",
                    "-c",
                    str(config_path),
                    "--workers",
                    str(workers),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**service_env(), **(extra_env or {})},
                cwd=cwd,
                start_new_session=True,  # a terminal's Ctrl-C must not stop it before we do
            )
        deadline = time.monotonic() + ready_timeout
        while (ready := _ready_line(log_path)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                raise RuntimeError(f"the aggregator did not start:\n{_tail(log_path)}")
            time.sleep(0.05)
        ports = ready["ports"]
        return cls(proc, int(ports["forward"]), int(ports["http"]), log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        return procfs.children(self.proc.pid)

    def cpu_seconds(self) -> float:
        """CPU time of the supervisor and every worker, including restarted ones."""
        return procfs.tree_cpu_seconds(self.proc.pid)

    def worker_memory(self, field: str) -> dict[int, int]:
        """``VmRSS`` (now) or ``VmHWM`` (peak) of each live worker, in bytes."""
        sizes = {}
        for pid in self.worker_pids():
            try:
                sizes[pid] = procfs.status_bytes(pid, field)
            except (OSError, KeyError):  # exited meanwhile
                continue
        return sizes

    def _samples(self) -> Iterator[Any]:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            yield from family.samples

    def metrics(self) -> dict[str, float]:
        """Every sample of GET /metrics summed over its labels, by sample name."""
        totals: dict[str, float] = defaultdict(float)
        for sample in self._samples():
            totals[sample.name] += sample.value
        return dict(totals)

    def metrics_by_label(self, name: str, label: str) -> dict[str, float]:
        """The samples called ``name`` summed by the value of one of their labels."""
        totals: dict[str, float] = defaultdict(float)
        for sample in self._samples():
            if sample.name == name:
                totals[sample.labels.get(label, "")] += sample.value
        return dict(totals)

    def has_finished(self, sent_events: int) -> bool:
        """True when the aggregator has read every sent event and settled each one (delivered,
        dropped or handed to a secondary) with nothing left in its buffers: after this, what
        the sink lacks is lost."""
        try:
            m = self.metrics()
        except OSError:  # not answering (busy, or gone): it has not said it is done
            return False
        received = m.get("aggregator_input_events_total", 0.0)
        settled = sum(
            m.get(name, 0.0)
            for name in (
                "aggregator_output_events_total",
                "aggregator_dropped_events_total",
                "aggregator_secondary_events_total",
            )
        )
        buffered = m.get("aggregator_buffer_bytes", 0.0)
        return received >= sent_events and settled >= received and buffered == 0

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM (a graceful stop that flushes everything), then the exit status."""
        return stop_gracefully(self.proc, timeout, self.kill)

    def kill(self) -> None:
        if self.proc.poll() is None:
            for pid in self.worker_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
        self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        return _tail(self.log_path, lines)


def stop_gracefully(
    proc: subprocess.Popen[bytes], timeout: float, kill: Callable[[], None]
) -> int:
    """SIGTERM, then the exit status; ``kill()`` and TimeoutExpired if it takes too long."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill()
        raise


def _ready_line(log_path: Path) -> dict[str, Any] | None:
    for line in log_path.read_text(errors="replace").splitlines():
        if READY in line:
            ready: dict[str, Any] = json.loads(line)
            return ready
    return None


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
