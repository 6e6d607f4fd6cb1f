"""The container image, built and run for real with podman (``make image-test``).

The container shares the host's network, so it reaches the Firehose emulator on the host's
loopback and the test reaches its ports. It runs on conf/fargate.toml, configured by the
environment alone, as on Fargate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from fluent import sender

from emulator import EmulatorThread
from tests.integration.conftest import free_port, wait_for

pytestmark = pytest.mark.image

IMAGE = os.environ.get("AGGREGATOR_IMAGE", "localhost/aggregator:test")
# This machine's kernel refuses crun, and podman's default limits are above what it allows.
PODMAN = ["podman", "--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout,
                          check=check)  # fmt: skip


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorThread]:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run 'make image-test', which installs it")
    with EmulatorThread() as emu:
        yield emu


class Container:
    def __init__(self, emulator: EmulatorThread, *extra: str) -> None:
        self.name = f"aggregator-test-{uuid.uuid4().hex[:8]}"
        self.forward_port, self.http_port = free_port(), free_port()
        env = {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "FIREHOSE_ENDPOINT": emulator.endpoint_url, "AWS_REGION": "us-west-2",
            "FORWARD_PORT": str(self.forward_port), "HTTP_PORT": str(self.http_port),
            "STOP_TIMEOUT": "20", "FLUSH_INTERVAL": "30s",  # only the stop flushes what is left
        }  # fmt: skip
        flags = [f"--env={k}={v}" for k, v in env.items()]
        podman("run", "--detach", "--name", self.name, "--network", "host", *LIMITS, *flags,
               *extra, IMAGE)  # fmt: skip

    def healthy(self) -> bool:
        """Runs the image's own HEALTHCHECK command."""
        return podman("healthcheck", "run", self.name, check=False).returncode == 0

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def ready_line(self) -> dict[str, object]:
        for line in self.logs().splitlines():
            if '"worker":"supervisor"' in line and '"message":"ready"' in line:
                return dict(json.loads(line))
        raise AssertionError(f"no ready line:\n{self.logs()}")

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)


@pytest.fixture
def container(emulator: EmulatorThread) -> Iterator[Container]:
    c = Container(emulator)
    yield c
    c.remove()


def send_forward(port: int, tag: str, count: int) -> None:
    logger = sender.FluentSender("", host="127.0.0.1", port=port, timeout=5)
    try:
        for i in range(count):
            assert logger.emit(tag, {"i": i, "log": f"{tag} line {i}"}), logger.last_error
    finally:
        logger.close()


def test_the_image_serves_flushes_on_stop_and_runs_as_a_user(
    container: Container, emulator: EmulatorThread
) -> None:
    started = time.monotonic()
    assert wait_for(container.healthy, timeout=60, interval=0.5), container.logs()
    print(f"healthy {time.monotonic() - started:.1f} s after start")
    uid = podman("exec", container.name, "id", "-u").stdout.strip()
    assert uid != "0"
    top = podman("top", container.name, "user", "args").stdout
    assert "root" not in top, top  # no process of the container runs as root
    send_forward(container.forward_port, "frontend-web", 100)
    send_forward(container.forward_port, "backend-api", 100)
    send_forward(container.forward_port, "healthcheck", 10)
    body = json.dumps([{"via": "http", "i": i} for i in range(50)]).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{container.http_port}/frontend-http",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
    # (Fluentd's "frontend*" matches one tag part: "frontend-web", not "frontend.web".)
    # Nothing is flushed before the stop (flush_interval 30 s): the stop must deliver it all.
    assert emulator.lines("elasticsearch-delivery-stream") == []
    stopping = time.monotonic()
    stop = podman("stop", "--time", "25", container.name, timeout=60)
    stop_seconds = time.monotonic() - stopping
    code = podman("inspect", container.name, "--format", "{{.State.ExitCode}}").stdout.strip()
    assert code == "0", container.logs()
    print(f"stopped in {stop_seconds:.1f} s: {stop.stdout.strip()}")
    search = [json.loads(line) for line in emulator.lines("elasticsearch-delivery-stream")]
    archive = [json.loads(line) for line in emulator.lines("s3-delivery-stream")]
    assert sorted(e["i"] for e in search if e["tag"] == "frontend-web") == list(range(100))
    assert sorted(e["i"] for e in search if e["tag"] == "frontend-http") == list(range(50))
    assert sorted(e["i"] for e in archive if e["tag"] == "backend-api") == list(range(100))
    assert len(search) == 150 and len(archive) == 100  # healthcheck went nowhere
    assert not any("Traceback" in line for line in container.logs().splitlines())


def test_workers_follow_the_container_cpu_quota(emulator: EmulatorThread) -> None:
    for cpus, workers in (("1", 1), ("0.5", 1)):
        c = Container(emulator, f"--cpus={cpus}")
        try:
            assert wait_for(c.healthy, timeout=60, interval=0.5), c.logs()
            assert c.ready_line()["workers"] == workers
        finally:
            c.remove()
