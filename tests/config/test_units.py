from __future__ import annotations

import pytest

from aggregator.config.units import parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("500ms", 0.5), ("2m", 120.0), ("1.5h", 5400.0), ("1d", 86400.0), ("3", 3.0),
     (2, 2.0), (0.25, 0.25)],
)  # fmt: skip
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("1MiB", 1024**2), ("2GiB", 2 * 1024**3), ("64KiB", 65536), ("1k", 1024), ("1kb", 1000),
     ("512", 512), (4096, 4096), ("1.5MiB", 1572864), ("8m", 8 * 1024**2)],
)  # fmt: skip
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["1x", "fast", "", "-1s", True, None, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("bad", ["1XB", "big", "", "-5", False, 1.5, None])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_rates() -> None:
    assert parse_rate("5MiB/s") == parse_rate("5MiB") == 5 * 2**20
    assert parse_rate(1000) == 1000 and parse_rate(" 1 KiB/s ") == 1024
    with pytest.raises(ValueError, match="invalid rate"):
        parse_rate("5 per second")
