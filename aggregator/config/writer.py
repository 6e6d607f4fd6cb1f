"""Configuration data written back as TOML, shaped as the README writes it: tables as
``[name]`` sections, lists of tables as ``[[name]]``. (tomllib reads TOML but does not write it;
this covers the value types a configuration holds.)"""

from __future__ import annotations

import json
import re
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def to_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []
    _table(data, (), lines)
    return "\n".join(lines).strip() + "\n"


def _table(table: dict[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    nested = []
    for key, value in table.items():
        if _is_table(value):
            nested.append((key, value))
        elif value is not None:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in nested:
        sub = (*path, key)
        if isinstance(value, dict):
            if not value or not all(_is_table(v) for v in value.values()):
                lines += ["", f"[{'.'.join(map(_key, sub))}]"]  # none for a table of tables
            _table(value, sub, lines)
        else:
            for item in value:
                lines += ["", f"[[{'.'.join(map(_key, sub))}]]"]
                _table(item, sub, lines)


def _is_table(value: Any) -> bool:
    """A table, or a list of tables: written as sections, after the plain values."""
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, dict) for v in value)
    return isinstance(value, dict)


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
