"""Human-friendly durations ("500ms", "1s", "2m") and sizes ("64KiB", "1MiB", "2GiB")."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}  # fmt: skip


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a string such as "500ms", "1s", "1.5m", "2h"."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(
            f"invalid duration {value!r}: use a number of seconds or e.g. '500ms', '1s'"
        )
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as "512KiB", "1MiB", "2GiB" (k, m, g: binary)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    else:
        raise ValueError(f"invalid size {value!r}: use a number of bytes or e.g. '64KiB', '1MiB'")
    if size < 0:
        raise ValueError(f"invalid size {value!r}: must not be negative")
    return size


def parse_rate(value: object) -> int:
    """Bytes per second from an integer or a size per second, such as "5MiB/s" ("5MiB" alone
    is read per second too)."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.endswith("/s"):
        text = text[:-2]
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(f"invalid rate {value!r}: use bytes per second or e.g. '5MiB/s'") from None
