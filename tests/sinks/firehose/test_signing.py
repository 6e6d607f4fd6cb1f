"""Our SigV4 signer against botocore's, which AWS's own SDK uses: the same inputs must give
the same headers, byte for byte."""

from __future__ import annotations

import calendar
import time

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from aggregator.sinks.firehose.service import CONTENT_TYPE, TARGET
from aggregator.sinks.firehose.signing import Signer, host_of


@pytest.mark.parametrize(
    ("url", "region", "token"),
    [
        ("https://firehose.us-west-2.amazonaws.com", "us-west-2", None),
        ("https://firehose.cn-north-1.amazonaws.com.cn", "cn-north-1", "session-token/+="),
        ("http://127.0.0.1:4573", "us-east-1", None),
        ("https://vpce-123.firehose.eu-west-1.vpce.amazonaws.com:443", "eu-west-1", "t"),
    ],
)
def test_the_signature_is_botocores(url: str, region: str, token: str | None) -> None:
    body = b'{"DeliveryStreamName":"s","Records":[{"Data":"eyJhIjoxfQo="}]}'
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    headers = {"Content-Type": CONTENT_TYPE, "X-Amz-Target": TARGET}
    request = AWSRequest(method="POST", url=url, data=body, headers=headers)
    SigV4Auth(credentials.get_frozen_credentials(), "firehose", region).add_auth(request)
    theirs = {k.lower(): v for k, v in request.headers.items()}
    # sign at botocore's own instant, so that both sign the same date
    now = calendar.timegm(time.strptime(theirs["x-amz-date"], "%Y%m%dT%H%M%SZ"))
    ours = Signer(url, region, CONTENT_TYPE, TARGET).headers(
        body, "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token, now
    )
    host = ours.pop("host")
    assert ours == theirs
    assert host == host_of(url)


def test_the_signing_key_follows_the_day_and_the_secret() -> None:
    signer = Signer("https://firehose.us-east-1.amazonaws.com", "us-east-1", CONTENT_TYPE, TARGET)
    day1 = signer.headers(b"{}", "A", "s1", None, 1_700_000_000)["authorization"]
    assert signer.headers(b"{}", "A", "s1", None, 1_700_000_000)["authorization"] == day1
    next_day = signer.headers(b"{}", "A", "s1", None, 1_700_000_000 + 86_400)["authorization"]
    assert next_day.split("Signature=")[1] != day1.split("Signature=")[1]
    assert signer.headers(b"{}", "A", "s2", None, 1_700_000_000)["authorization"] != day1
