"""The AWS blog's fluent.conf for this very setup, run as it is (ports aside) with the
Firehose emulator as its Firehose: events land where its <match> and <label> say."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from fluent import sender

from emulator import EmulatorThread
from tests.integration.conftest import StartAggregator, wait_for

BLOG = Path(__file__).parents[1] / "config" / "fluentd" / "aws-blog.conf"


def test_the_aws_blog_fluent_conf_runs_and_routes(
    start_aggregator: StartAggregator, emulator: EmulatorThread
) -> None:
    # Only the ports change, so that the test runs beside anything else on this machine.
    text = re.sub(r"port +24224", "port {forward_port}", BLOG.read_text())
    text = text.replace("port 8888", "port {http_port}").replace("workers 4", "workers 2")
    agg = start_aggregator(
        text, suffix=".conf",
        # botocore's per-service endpoint variable: the config itself names only the region
        env={"AWS_ENDPOINT_URL_FIREHOSE": emulator.endpoint_url,
             "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
    )  # fmt: skip
    logger = sender.FluentSender("", host="127.0.0.1", port=agg.forward_port, timeout=5)
    for tag, n in (("frontend-web", 30), ("backend-api", 20), ("health", 5), ("other", 3)):
        for i in range(n):
            assert logger.emit(tag, {"i": i}), logger.last_error
    logger.close()
    for tag in ("health", "frontend-web"):  # the http source has no label: top-level routes
        body = json.dumps({"via": "http"}).encode()
        req = urllib.request.Request(f"{agg.http}/{tag}", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    def delivered() -> tuple[int, int]:
        return (len(emulator.lines("elasticsearch-delivery-stream")),
                len(emulator.lines("s3-delivery-stream")))  # fmt: skip

    assert wait_for(lambda: delivered() == (30, 20), timeout=15), delivered()
    search = [json.loads(line) for line in emulator.lines("elasticsearch-delivery-stream")]
    assert sorted(e["i"] for e in search) == list(range(30))
    assert "tag" not in search[0]  # kinesis_firehose without <inject> sends the record alone
    # "health" from forward and "other" match nothing in @mainstream; "frontend-web" over
    # http matches nothing at the top level: counted as unmatched, as Fluentd warns of them
    assert wait_for(lambda: agg.metric("aggregator_unmatched_events_total") == 5 + 3 + 1)
    assert agg.metric("aggregator_output_events_total", destination="null_1") == 1
    assert agg.stop() == 0
    assert delivered() == (30, 20)
