"""Reading a config (TOML, or a fluent.conf): parse, expand ``${VAR}`` from the environment,
validate.

Expansion happens on parsed string values, not on the file's text, so an environment value can
never change the TOML structure. ``${VAR}`` must be set; ``${VAR:-default}`` falls back when VAR
is unset or empty; ``$${`` writes a literal ``${``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from aggregator.config import fluentd
from aggregator.config.errors import ConfigError
from aggregator.config.model import Config

__all__ = ["ConfigError", "expand", "load", "loads", "parse", "read"]

_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: str, env: Mapping[str, str], where: str) -> str:
    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name, default = m.group(1), m.group(2)
        found = env.get(name)
        if found:
            return found
        if default is not None:
            return default
        if found is not None:
            return found
        raise ConfigError(
            f"{where}: environment variable {name} is not set (use ${{{name}:-default}})"
        )

    return _VAR.sub(substitute, value)


def _expand_all(data: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(data, str):
        return expand(data, env, where)
    if isinstance(data, dict):
        return {k: _expand_all(v, env, f"{where}.{k}" if where else k) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_all(v, env, f"{where}.{i}") for i, v in enumerate(data)]
    return data


def _key_path(data: Any, loc: tuple[int | str, ...]) -> str:
    """``loc`` as the user wrote it: pydantic adds union tags (``firehose``) that are not keys."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        in_dict = isinstance(data, dict) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and part < len(data)
        if in_dict or in_list:
            data = data[part]
        elif i != len(loc) - 1:
            continue
        parts.append(str(part))
    return ".".join(parts)


RENAMED = {
    "shutdown_timeout": "stop_timeout (the platform's kill timer: SIGKILL comes this long after "
    "SIGTERM, 30 s by default on ECS; the stop now plans to end before it)",
}
"""Keys of earlier versions, by name, and what took their place."""


def _message(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1]) if error.get("loc") else ""
        return f"unknown key; replaced by {RENAMED[key]}" if key in RENAMED else "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def parse(data: dict[str, Any], env: Mapping[str, str] | None = None) -> Config:
    expanded = _expand_all(data, os.environ if env is None else env, "")
    try:
        return Config.model_validate(expanded)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            path = _key_path(expanded, tuple(error["loc"]))
            lines.append(f"{path}: {_message(error)}" if path else _message(error))
        raise ConfigError("\n".join(lines)) from None


def loads(text: str, env: Mapping[str, str] | None = None, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return parse(data, env)


def read(path: str | Path, env: Mapping[str, str] | None = None) -> tuple[Config, list[str]]:
    """The config in ``path``, TOML or Fluentd's ``fluent.conf``, and the warnings about what
    of a fluent.conf was left out (see config/fluentd.py)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    if fluentd.looks_like_fluentd(path, text):
        data, warnings = fluentd.convert_file(path)
        return parse(data, env), warnings
    return loads(text, env, str(path)), []


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    return read(path, env)[0]
