"""The environment's and the ECS task role's credentials, read without botocore: which source
the environment names, and the container endpoint fetched, refreshed and kept as botocore
does. Against a real HTTP endpoint on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from botocore.exceptions import CredentialRetrievalError

from aggregator.sinks.firehose.credentials import (
    CONTAINER_ENDPOINT,
    Container,
    Frozen,
    Static,
    from_environment,
)
from emulator import EmulatorThread
from tests.sinks.firehose.test_service import LINES


def source(env: dict[str, str], home: Path) -> Any:
    return from_environment(env, home)


def test_keys_in_the_environment_come_first(tmp_path: Path) -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "tok",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/x",
    }  # fmt: skip
    found = source(env, tmp_path)
    assert isinstance(found, Static)
    assert asyncio.run(found.get_frozen_credentials()) == Frozen("AKID", "secret", "tok")


def test_the_task_role_endpoint(tmp_path: Path) -> None:
    found = source({"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/abc"}, tmp_path)
    assert isinstance(found, Container)
    assert found.url == CONTAINER_ENDPOINT + "/v2/credentials/abc"
    for full in ("http://127.0.0.1:9/creds", "http://169.254.170.23/v1/credentials",
                 "https://credentials.example.com/x"):  # fmt: skip
        found = source({"AWS_CONTAINER_CREDENTIALS_FULL_URI": full}, tmp_path)
        assert isinstance(found, Container) and found.url == full


@pytest.mark.parametrize(
    "env",
    [
        {},  # instance metadata, or nothing: botocore's chain says which
        {"AWS_ACCESS_KEY_ID": "AKID"},  # partial: botocore's error
        {"AWS_PROFILE": "dev", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/x"},
        {"AWS_WEB_IDENTITY_TOKEN_FILE": "/t", "AWS_ROLE_ARN": "arn:aws:iam::1:role/r"},
        {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://example.com/creds"},  # botocore refuses
    ],
)
def test_what_only_botocore_reads_is_left_to_it(env: dict[str, str], tmp_path: Path) -> None:
    assert source(env, tmp_path) is None


def test_a_profile_file_comes_before_the_task_role(tmp_path: Path) -> None:
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text("[default]\nregion = eu-west-1\n")
    assert source({"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/x"}, tmp_path) is None


class Endpoint:
    """A container-credentials endpoint: answers with the next keys, or fails when told."""

    def __init__(self) -> None:
        self.calls: list[str | None] = []  # the Authorization header of each
        self.failing = False
        self.expires_in = 6 * 3600.0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(request.headers.get("Authorization"))
        if self.failing:
            return web.json_response({"message": "not now"}, status=500)
        expiry = datetime.fromtimestamp(self.clock() + self.expires_in, UTC)
        n = len(self.calls)
        return web.json_response({"AccessKeyId": f"ASIA{n}", "SecretAccessKey": f"s{n}",
                                  "Token": f"t{n}",
                                  "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")})  # fmt: skip

    now = 1_800_000_000.0

    def clock(self) -> float:
        return self.now


@asynccontextmanager
async def endpoint() -> AsyncIterator[Endpoint]:
    served = Endpoint()
    app = web.Application()
    app.router.add_get("/creds", served.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    served.url = f"http://127.0.0.1:{runner.addresses[0][1]}/creds"
    try:
        yield served
    finally:
        await runner.cleanup()


def run(test: Callable[[Endpoint], Any]) -> None:
    async def main() -> None:
        async with endpoint() as served:
            await test(served)

    asyncio.run(main())


def test_fetched_once_then_again_within_15_minutes_of_expiry(tmp_path: Path) -> None:
    token = tmp_path / "token"

    async def test(served: Endpoint) -> None:
        token.write_text("first\n")
        env = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": served.url,
               "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token)}  # fmt: skip
        found = from_environment(env, tmp_path)
        assert isinstance(found, Container)
        found._clock = served.clock
        assert await found.get_frozen_credentials() == Frozen("ASIA1", "s1", "t1")
        assert await found.get_frozen_credentials() == Frozen("ASIA1", "s1", "t1")
        assert served.calls == ["first"]
        token.write_text("rotated")  # read again at the next fetch (EKS Pod Identity)
        served.now += 6 * 3600 - 14 * 60  # inside the refresh window
        assert await found.get_frozen_credentials() == Frozen("ASIA2", "s2", "t2")
        assert served.calls == ["first", "rotated"]

    run(test)


def test_a_failed_refresh_keeps_the_keys_until_10_minutes_before_expiry() -> None:
    async def test(served: Endpoint) -> None:
        found = Container(served.url, lambda: None, served.clock)
        assert (await found.get_frozen_credentials()).access_key == "ASIA1"
        served.failing = True
        served.now += 6 * 3600 - 12 * 60  # due for a refresh, not yet for a forced one
        assert (await found.get_frozen_credentials()).access_key == "ASIA1"
        served.now += 3 * 60  # 9 minutes left: no more
        with pytest.raises(CredentialRetrievalError, match="500"):
            await found.get_frozen_credentials()
        served.failing = False
        assert (await found.get_frozen_credentials()).access_key.startswith("ASIA")

    run(test)


def test_concurrent_calls_fetch_once() -> None:
    async def test(served: Endpoint) -> None:
        found = Container(served.url, lambda: "tok", served.clock)
        keys = await asyncio.gather(*(found.get_frozen_credentials() for _ in range(20)))
        assert {k.access_key for k in keys} == {"ASIA1"}
        assert served.calls == ["tok"]

    run(test)


def test_a_sink_on_a_task_role_signs_with_it_and_never_loads_botocore_session(
    emulator: EmulatorThread, tmp_path: Path
) -> None:
    """The process a worker is: its Firehose calls signed with the task role's keys, and
    neither botocore's session nor aiobotocore imported (about 18 MiB a worker)."""
    script = f"""
import asyncio, sys
from aiohttp import web
from aggregator.sinks.base import DELIVERED
from aggregator.sinks.firehose.service import FirehoseService
from tests.sinks.firehose.support import firehose_settings
from tests.sinks.firehose.test_service import LINES, batch_of
from tests.sinks.firehose.test_credentials import endpoint

async def main():
    async with endpoint() as served:
        import os
        os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = served.url
        service = FirehoseService("role", firehose_settings({emulator.endpoint_url!r}))
        await service.start()
        print("delivered:", await service.put_batch(batch_of(LINES)) is DELIVERED)
        await service.close()
    print(sorted(m for m in sys.modules if m.startswith(("aiobotocore", "botocore.session"))))

asyncio.run(main())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_REGION="us-east-1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parents[3])  # fmt: skip
    assert done.returncode == 0, done.stderr
    delivered, modules = done.stdout.splitlines()[-2:]
    assert delivered == "delivered: True", done.stdout
    assert modules == "[]"
    assert emulator.records("events") == LINES
    assert set(emulator.stats()["calls_by_access_key"]) == {"ASIA1"}
