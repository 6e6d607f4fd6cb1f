"""The AWS credentials a Fargate task has, read without botocore.

A task gets its credentials from the environment (``AWS_ACCESS_KEY_ID``...) or, with a task
role, from the ECS container endpoint (``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI``). Both are
read here, as the SDKs read them; loading botocore's session and credential chain for them
would cost every worker about 18 MiB. Anything else of the SDKs' chain (a profile, web
identity, SSO, instance metadata) and ``assume_role`` are left to botocore (service.py), which
is loaded only then: :func:`from_environment` returns ``None`` whenever the environment
suggests one of those, so the order of the SDKs' chain is kept.

Task-role credentials are fetched again within :data:`REFRESH_BEFORE` of their expiry, as
botocore does; a failed fetch keeps the current ones until :data:`MUST_REFRESH_BEFORE`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit

import aiohttp
from botocore.exceptions import CredentialRetrievalError  # botocore's exceptions alone: light

CONTAINER_ENDPOINT = "http://169.254.170.2"
"""Where ``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` is relative to (ECS)."""
CONTAINER_HOSTS = frozenset({"169.254.170.2", "169.254.170.23", "fd00:ec2::23", "localhost"})
"""Hosts a full URI may name over plain http besides loopback addresses (botocore's list)."""
FETCH_TIMEOUT = 2.0
FETCH_ATTEMPTS = 3
REFRESH_BEFORE = 15 * 60.0
"""Seconds before expiry from which credentials are fetched again (botocore's advisory
refresh)."""
MUST_REFRESH_BEFORE = 10 * 60.0
"""Seconds before expiry from which credentials that could not be fetched again are not used
(botocore's mandatory refresh)."""
_DEFERRED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
             "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")  # fmt: skip
"""Variables that name a source this module does not read: botocore's chain decides."""


class Frozen(NamedTuple):
    access_key: str
    secret_key: str
    token: str | None


class Credentials(Protocol):
    async def get_frozen_credentials(self) -> Frozen: ...


class Static:
    """Credentials from the environment: they do not change while the process runs."""

    def __init__(self, frozen: Frozen) -> None:
        self._frozen = frozen

    async def get_frozen_credentials(self) -> Frozen:
        return self._frozen


class Container:
    """The task role's credentials from the ECS container endpoint, fetched again before they
    expire."""

    def __init__(
        self, url: str, token: Callable[[], str | None], clock: Callable[[], float] = time.time
    ) -> None:
        self.url = url
        self._token = token
        self._clock = clock
        self._frozen: Frozen | None = None
        self._expiry = 0.0
        self._lock = asyncio.Lock()

    async def get_frozen_credentials(self) -> Frozen:
        if self._frozen is None or self._clock() >= self._expiry - REFRESH_BEFORE:
            async with self._lock:  # one fetch for every call that found them due
                if self._frozen is None or self._clock() >= self._expiry - REFRESH_BEFORE:
                    try:
                        self._frozen, self._expiry = await self._fetch()
                    except CredentialRetrievalError:
                        if self._frozen is None or (
                            self._clock() >= self._expiry - MUST_REFRESH_BEFORE
                        ):
                            raise
                        # Still good for a while: use them, and ask again at the next call.
        assert self._frozen is not None
        return self._frozen

    async def _fetch(self) -> tuple[Frozen, float]:
        headers = {"Accept": "application/json"}
        if (token := self._token()) is not None:
            headers["Authorization"] = token
        error = ""
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            for _ in range(FETCH_ATTEMPTS):
                try:
                    async with session.get(self.url, headers=headers) as resp:
                        body = await resp.json(content_type=None)
                        if resp.status != 200:
                            error = f"{resp.status}: {body}"
                            continue
                    return _parse(body)
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
        raise CredentialRetrievalError(provider="container-role", error_msg=error[:300])


def _parse(body: Mapping[str, str]) -> tuple[Frozen, float]:
    frozen = Frozen(body["AccessKeyId"], body["SecretAccessKey"], body.get("Token"))
    expiration = body.get("Expiration")
    if not expiration:
        return frozen, math.inf  # credentials that do not expire
    return frozen, datetime.fromisoformat(expiration.replace("Z", "+00:00")).timestamp()


def _container_url(env: Mapping[str, str]) -> str | None:
    if relative := env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        return CONTAINER_ENDPOINT + relative
    full = env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if not full:
        return None
    parts = urlsplit(full)
    host = parts.hostname or ""
    if parts.scheme == "https" or host in CONTAINER_HOSTS:
        return full
    try:
        return full if parts.scheme == "http" and ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return None  # a host botocore refuses: let it say so


def _authorization(env: Mapping[str, str]) -> Callable[[], str | None]:
    """The container endpoint's authorization token: read from its file at every fetch (EKS
    Pod Identity rotates it), else the variable."""
    path = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    if path:
        return lambda: Path(path).read_text().strip()
    value = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
    return lambda: value


def from_environment(
    env: Mapping[str, str] = os.environ, home: Path | None = None
) -> Credentials | None:
    """The credentials the environment gives without botocore; ``None``: ask botocore's chain
    (nothing here, or a source only botocore reads)."""
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:  # the chain's first source
        token = env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN") or None
        return Static(Frozen(key, secret, token))
    if key or secret or any(env.get(name) for name in _DEFERRED):
        return None  # partial keys (botocore says so), or a source that comes before
    try:
        aws = (home if home is not None else Path.home()) / ".aws"
        if (aws / "credentials").exists() or (aws / "config").exists():
            return None  # a profile comes before the container in the chain
    except (RuntimeError, OSError):  # no home directory to look in: no profile either
        pass
    url = _container_url(env)
    return None if url is None else Container(url, _authorization(env))
