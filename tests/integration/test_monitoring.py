"""The shipped dashboard and alert rules against a real Prometheus (Debian's ``prometheus``)
scraping a running service: every panel's query returns series, and the outage alert goes
pending while Firehose (the emulator) refuses every call."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregator.protocol import encode_message
from emulator import EmulatorThread
from tests.integration.conftest import (
    BASE_CONFIG,
    Aggregator,
    StartAggregator,
    free_port,
    wait_for,
)
from tests.integration.test_firehose import firehose_destination, routes, send_with_acks

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "aggregator.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")
OUTAGE_ALERT = "AggregatorDeliveryStalled"

needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="needs Debian's prometheus package (make prometheus-deps)"
)

CONFIG = (
    BASE_CONFIG.replace(
        "port = {forward_port}\n",
        'port = {forward_port}\nidle_timeout = "1s"\nmax_connections = 20\n',
    )
    + routes(("app.**", "fh"), ("dlq.**", "missing"), ("noisy.**", "fh"))
    + firehose_destination("fh", "{endpoint}", "events", secondary=None)
    + firehose_destination("missing", "{endpoint}", "no-such-stream")
    + """
[destinations.dead]
type = "file"
path = "{data_dir}"

[limits]
rate = "100MiB/s"
burst = "100MiB"

[limits.overrides.noisy]
rate = "1KiB/s"
burst = "1KiB"
"""
)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, with the dashboard's variables
    as Grafana fills them with "All" selected."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in (("$job", ".+"), ("$instance", ".+"),
                                    ("$__rate_interval", "15s")):  # fmt: skip
                expr = expr.replace(variable, value)
            out.append((panel["title"], expr))
    return out


class Prometheus:
    def __init__(self, directory: Path, target: str) -> None:
        self.port = free_port()
        config = directory / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{json.dumps(str(ALERTS))}]\n"
            "scrape_configs:\n"
            f"  - job_name: aggregator\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        assert PROMETHEUS is not None
        self.log = (directory / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        if not wait_for(self._ready, 30, 0.2):
            raise RuntimeError("prometheus did not start")

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
            return json.loads(resp.read())

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1):
                return True
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self._get("/api/v1/alerts")["data"]["alerts"]
                if a["labels"]["alertname"] == name]  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(agg: Aggregator) -> Prometheus:
        started.append(Prometheus(tmp_path, f"127.0.0.1:{agg.http_port}"))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def post(agg: Aggregator, tag: str, body: bytes) -> int:
    request = urllib.request.Request(f"{agg.http}/{tag}", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


class Load(threading.Thread):
    """Acknowledged forward messages on ``app.web``, a few a second, until stopped; sent again
    on a new connection when one is refused or its worker is killed (as a client with acks)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.done = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.done.is_set():
            try:
                send_with_acks(self.port, "app.web", range(self.sent, self.sent + 200))
            except (OSError, AssertionError):
                continue
            self.sent += 200
            self.done.wait(0.2)


def every_kind_of_trouble(agg: Aggregator) -> None:
    """What the panels that count trouble need to have something to show."""
    noisy = b'{"log": "' + b"x" * 4096 + b'"}'
    assert 429 in [post(agg, "noisy.api", noisy) for _ in range(5)]  # over its rate: limited
    assert post(agg, "dlq.api", b'{"log": "to a stream that does not exist"}') == 200
    assert post(agg, "stray", b'{"log": "no route"}') == 200  # unmatched
    big = b'{"log": "' + b"y" * (1100 * 1024) + b'"}'
    assert post(agg, "app.big", big) == 200  # over Firehose's record size: dropped
    with agg.connect() as sock:  # bad input: a byte msgpack never uses
        sock.sendall(b"\xc1" * 16)
        sock.settimeout(5)
        while sock.recv(4096):
            pass
    # More connections than both workers' max_connections: some refused; the rest are closed
    # when idle (1 s).
    idle = [socket.create_connection(("127.0.0.1", agg.forward_port)) for _ in range(60)]
    for sock in idle:
        sock.sendall(encode_message("app.idle", 1700000000, {"log": "then nothing"}))
    time.sleep(2)
    for sock in idle:
        sock.close()
    os.kill(sorted(agg.worker_pids())[0], signal.SIGKILL)  # a worker restart


@needs_prometheus
@pytest.mark.timeout(360)
def test_every_panel_has_data_and_the_outage_alert_goes_pending(
    start_aggregator: StartAggregator, emulator: EmulatorThread, prometheus_for: Any
) -> None:
    emulator.configure(streams=["events"], fail_rate=0.2)
    agg = start_aggregator(CONFIG.replace("{endpoint}", emulator.endpoint_url))
    prometheus = prometheus_for(agg)
    load = Load(agg.forward_port)
    load.start()
    began = time.monotonic()
    try:
        every_kind_of_trouble(agg)
        queries = dashboard_queries()
        assert len(queries) >= 20

        def empty() -> list[str]:
            return [f"{title}: {expr}" for title, expr in queries if not prometheus.query(expr)]

        assert wait_for(lambda: not empty(), 60, 1), "\n".join(["no data for:", *empty()])
        print(f"every panel had data {time.monotonic() - began:.0f} s after the start")

        emulator.configure(fail_rate=0.0, throttle_rate=1.0)  # every call refused
        outage = time.monotonic()

        def pending() -> list[dict[str, Any]]:
            return [a for a in prometheus.alerts(OUTAGE_ALERT)
                    if a["labels"]["destination"] == "fh"]  # fmt: skip

        assert wait_for(pending, 180, 1), f"{OUTAGE_ALERT} did not go pending in 3 minutes"
        took = time.monotonic() - outage
        assert pending()[0]["state"] == "pending"  # its `for` is 3 more minutes
        # Every other destination is delivering or empty: no alert for them.
        assert {a["labels"]["destination"] for a in prometheus.alerts(OUTAGE_ALERT)} == {"fh"}
        print(f"{OUTAGE_ALERT} pending {took:.0f} s after the outage began")
    finally:
        load.done.set()
        load.join(30)


def test_the_dashboard_asks_for_its_datasource() -> None:
    """Imported into any Grafana (or Amazon Managed Grafana), it asks which Prometheus."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert "aggregator_" in target["expr"]


def test_every_metric_the_dashboard_and_alerts_use_exists() -> None:
    """A renamed metric must not leave a panel or an alert silently empty."""
    import re

    from aggregator import metrics

    names = set()
    for family in metrics.REGISTRY.collect():
        names |= {family.name, f"{family.name}_total", f"{family.name}_bucket"}
    text = DASHBOARD.read_text() + ALERTS.read_text()
    used = set(re.findall(r"\baggregator_[a-z_]+", text))
    assert used, "no metric found"
    assert used <= names, sorted(used - names)
