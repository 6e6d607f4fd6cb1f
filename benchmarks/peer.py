"""A peer under the same load as the aggregator: Fluent Bit, with its forward input and its
kinesis_firehose output pointed at the same Firehose stand-in (``--peer fluent-bit``).

It stands where :class:`benchmarks.service.Service` stands in a run: a forward port, its CPU
time and memory from /proc, a graceful stop. It has no metrics endpoint, so the runner knows it
is done only when the sink holds every event.

Fluent Bit's own buffers are unbounded here (no ``Mem_Buf_Limit``), as it runs by default.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks import procfs
from benchmarks.service import STREAM, stop_gracefully

PEERS = ("fluent-bit",)
DEFAULT_PEER_BIN = Path(__file__).parents[1].parent / "shared" / "peers" / "fluent-bit"
"""Where the project's workplace keeps a Fluent Bit build that can talk plain HTTP to a local
Firehose stand-in (see shared/peers/README.md)."""


def fluent_bit_config(forward_port: int, sink_url: str, flush_s: float, workers: int) -> str:
    sink = urlsplit(sink_url)
    return f"""\
[SERVICE]
    Flush        {flush_s:g}
    Grace        5
    Log_Level    warn

[INPUT]
    Name    forward
    Listen  127.0.0.1
    Port    {forward_port}

[OUTPUT]
    Name             kinesis_firehose
    Match            *
    region           us-east-1
    delivery_stream  {STREAM}
    endpoint         http://{sink.hostname}
    port             {sink.port}
    workers          {workers}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class FluentBit:
    proc: subprocess.Popen[bytes]
    forward_port: int
    log_path: Path

    @classmethod
    def start(
        cls, binary: Path, sink_url: str, flush_s: float, workers: int, workdir: Path,
        ready_timeout: float = 15.0,
    ) -> FluentBit:  # fmt: skip
        if not os.access(binary, os.X_OK):
            raise RuntimeError(f"no Fluent Bit binary at {binary} (--peer-bin)")
        port = _free_port()
        config = workdir / "fluent-bit.conf"
        config.write_text(fluent_bit_config(port, sink_url, flush_s, workers))
        log_path = workdir / "fluent-bit.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(binary), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"},
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    raise RuntimeError(
                        f"Fluent Bit did not start:\n{log_path.read_text(errors='replace')}"
                    ) from None
                time.sleep(0.05)
        return cls(proc, port, log_path)

    def cpu_seconds(self) -> float:
        return procfs.tree_cpu_seconds(self.proc.pid)

    def worker_memory(self, field: str) -> dict[int, int]:
        """``VmRSS`` or ``VmHWM`` of the one Fluent Bit process (its threads share it)."""
        try:
            return {self.proc.pid: procfs.status_bytes(self.proc.pid, field)}
        except (OSError, KeyError):
            return {}

    def has_finished(self, sent_events: int) -> bool:
        return False  # no metrics here: done when the sink holds everything

    def stop(self, timeout: float = 90.0) -> int:
        return stop_gracefully(self.proc, timeout, self.kill)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
