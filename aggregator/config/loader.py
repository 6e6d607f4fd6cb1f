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


PLACEHOLDERS = frozenset({"tag", "hostname", "time"})
"""Names that, in a filter's settings, are record_transformer's placeholders (``${tag}``), not
environment variables."""


def expand(value: str, env: Mapping[str, str], where: str, keep: frozenset[str] = frozenset()
           ) -> str:  # fmt: skip
    """``value`` with ``${VAR}`` looked up in ``env`` (names in ``keep`` are left as they
    are)."""

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name, default = m.group(1), m.group(2)
        if name in keep and default is None:
            return m.group(0)
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
        keep = PLACEHOLDERS if where.startswith("filters.") else frozenset()
        return expand(data, env, where, keep)
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


RENAMED: dict[tuple[str, ...], tuple[str, str]] = {
    ("server", "shutdown_timeout"): (
        "stop_timeout",
        "the platform's kill timer: SIGKILL comes this long after SIGTERM, 30 s by default on "
        "ECS; the stop plans to end before it",
    ),
}
"""Keys of earlier versions (their table, then the key), what took their place, and what it
means. A config that still has one is read as if it had the new key, with a warning."""


def _rename(data: dict[str, Any], warnings: list[str]) -> None:
    for (*tables, old), (new, means) in RENAMED.items():
        table: Any = data
        for name in tables:
            table = table.get(name) if isinstance(table, dict) else None
        if not isinstance(table, dict) or old not in table:
            continue
        where = ".".join([*tables, old])
        if new in table:
            raise ConfigError(f"{where}: renamed {new}, which is set too: keep {new}")
        table[new] = table.pop(old)
        warnings.append(f"{where} is now {new} ({means}); read as {new}")


def _message(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def parse(
    data: dict[str, Any], env: Mapping[str, str] | None = None,
    warnings: list[str] | None = None,
) -> Config:  # fmt: skip
    """Validated configuration from parsed ``data``; renamed keys are read with a warning
    (added to ``warnings``)."""
    data = dict(data)
    _rename(data, [] if warnings is None else warnings)
    expanded = _expand_all(data, os.environ if env is None else env, "")
    try:
        return Config.model_validate(expanded)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            path = _key_path(expanded, tuple(error["loc"]))
            lines.append(f"{path}: {_message(error)}" if path else _message(error))
        raise ConfigError("\n".join(lines)) from None


def loads(
    text: str, env: Mapping[str, str] | None = None, source: str = "<config>",
    warnings: list[str] | None = None,
) -> Config:  # fmt: skip
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return parse(data, env, warnings)


def read(path: str | Path, env: Mapping[str, str] | None = None) -> tuple[Config, list[str]]:
    """The config in ``path``, TOML or Fluentd's ``fluent.conf``, and the warnings about what
    of a fluent.conf was left out (see config/fluentd.py)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    if fluentd.looks_like_fluentd(path, text):
        data, warnings = fluentd.convert_file(path)
        return parse(data, env, warnings), warnings
    warnings = []
    return loads(text, env, str(path), warnings), warnings


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    return read(path, env)[0]
