"""Ruby's regular expressions, record accessors and to_s, as Fluentd's filters read them."""

from __future__ import annotations

import pytest

from aggregator.ruby import (
    RubyRegexError,
    accessor,
    compile_ruby,
    deleter,
    float_to_s,
    to_s,
)


@pytest.mark.parametrize(
    ("pattern", "text", "found"),
    [
        ("/^error/", "ok\nerror: x", True),  # ^ matches at every line, as in Ruby
        ("/^error/", "ok error: x", False),  # (searched without MULTILINE: one line)
        ("/ok$/", "ok\nerror: x", True),
        ("/ok$/", "ok error", False),
        ("/ok$/", "is ok", True),
        ("/^ERROR/i", "error", True),
        ("/a.b/", "a\nb", False),
        ("/a.b/m", "a\nb", True),  # Ruby's m is Python's DOTALL
        (r"/(?<level>\w+): \h+\z/", "warn: beef", True),
        (r"/x\z/", "x\n", False),
        (r"/x\Z/", "x\n", True),
        (r"[[:digit:]]+", "ab12", True),
        (r"/(?<w>a)\k<w>/", "aa", True),
        ("cannot", "a bare pattern: cannot", True),
    ],
)
def test_ruby_regexps_read_as_ruby_reads_them(pattern: str, text: str, found: bool) -> None:
    assert bool(compile_ruby(pattern).search(text)) is found


@pytest.mark.parametrize(
    "pattern", [r"/\p{Alpha}/", "/[a-z&&[^aeiou]]/", r"/\G/", r"/(?<n>a)\g<n>/"]
)
def test_what_python_cannot_do_is_an_error_naming_the_pattern(pattern: str) -> None:
    with pytest.raises(RubyRegexError):
        compile_ruby(pattern)


def test_record_accessors_reach_into_maps_and_arrays() -> None:
    record = {"a": {"b": [{"c": 1}, {"c": 2}]}, "d.e": 3}
    assert accessor("$.a.b[1].c")(record) == 2
    assert accessor("$['a']['b'][0]['c']")(record) == 1
    assert accessor("d.e")(record) == 3  # without $.: one top-level key
    assert accessor("$.a.x.y")(record) is None
    deleter("$.a.b[0]")(record)
    assert record["a"]["b"] == [{"c": 2}]


def test_values_are_written_as_ruby_to_s_writes_them() -> None:
    assert [to_s(v) for v in (None, True, 3, "x")] == ["", "true", "3", "x"]
    assert [float_to_s(v) for v in (1.0, 1e16, 1.5e-5, 0.0001)] == [
        "1.0", "1.0e+16", "1.5e-05", "0.0001"]  # fmt: skip
    assert to_s({"a": [1, None, "q"]}) == '{"a"=>[1, nil, "q"]}'
