"""The command line around the running service: ``aggregator health`` and ``AGGREGATOR_CONFIG``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import FILE_CONFIG, StartAggregator, free_port


def aggregator(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AGGREGATOR_CONFIG"}
    if config is not None:
        env["AGGREGATOR_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "aggregator", *args], env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_health_exits_0_when_healthy_and_1_when_not(
    start_aggregator: StartAggregator, tmp_path: Path
) -> None:
    agg = start_aggregator(FILE_CONFIG)
    config = tmp_path / "aggregator0.toml"  # the file the fixture wrote; found via the env
    healthy = aggregator("health", config=config)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert json.loads(healthy.stdout)["status"] == "ok"
    assert aggregator("health", "--url", f"{agg.http}/api/health").returncode == 0
    agg.stop()
    down = aggregator("health", config=config)
    assert down.returncode == 1 and "unhealthy" in down.stdout
    nothing = aggregator("health", "--url", f"http://127.0.0.1:{free_port()}/api/health")
    assert nothing.returncode == 1 and "unhealthy" in nothing.stdout


def test_the_config_comes_from_the_environment_when_c_is_not_given(tmp_path: Path) -> None:
    good = tmp_path / "a.toml"
    good.write_text(FILE_CONFIG.replace("{forward_port}", "0").replace("{http_port}", "0")
                    .replace("{data_dir}", str(tmp_path)))  # fmt: skip
    checked = aggregator("check", config=good)
    assert checked.returncode == 0 and "routes (first match wins)" in checked.stdout
    bad = tmp_path / "b.toml"
    bad.write_text("[server]\nworkers = 0\n")
    refused = aggregator("check", config=bad)
    assert refused.returncode == 2 and str(bad) in refused.stderr
