"""Tag patterns against Fluentd's own match cases (test/test_match.rb) and route order."""

from __future__ import annotations

import pytest

from aggregator.routing import CACHE_LIMIT, PatternError, Router, TagCache, compile_match

MATCHES = [
    ("a", "a"), ("a.b", "a.b"),
    ("a*", "a"), ("a*", "ab"), ("a*", "abc"),
    ("*a", "a"), ("*a", "ba"), ("*a", "cba"),
    ("*a*", "a"), ("*a*", "ba"), ("*a*", "ac"), ("*a*", "bac"),
    ("a.*", "a.b"), ("a.*", "a.c"),
    ("a.*.c", "a.b.c"), ("a.*.c", "a.c.c"),
    ("a.**", "a"), ("a.**", "a.b"), ("a.**", "a.b.c"),
    ("a**", "a"), ("a**", "ab"), ("a**", "abc"), ("a**", "a.b"), ("a**", "ab.c"),
    ("a**", "ab.d.e"),
    ("**.a", "a"), ("**.a", "b.a"), ("**.a", "cb.a"), ("**.a", "d.e.a"),
    ("**a", "a"), ("**a", "ba"), ("**a", "c.ba"), ("**a", "b.a"), ("**a", "cb.a"),
    ("**a", "d.e.a"),
    ("a.{b,c}", "a.b"), ("a.{b,c}", "a.c"),
    ("a.{b,c}.**", "a.b"), ("a.{b,c}.**", "a.c"),
    ("a.{b.**,c}", "a.b"), ("a.{b.**,c}", "a.b.c"), ("a.{b.**,c}", "a.c"),
    ("a.**.b", "a.b"), ("a.**.b", "a.x.b"), ("a.**.b", "a.x.y.b"),
    ("**", "anything.at.all"), ("**", "x"),
    ("frontend* api.**", "frontend"), ("frontend* api.**", "frontend-web"),
    ("frontend* api.**", "api"), ("frontend* api.**", "api.v1.users"),
    ("docker.{web,api}-*", "docker.web-1"),
]  # fmt: skip

NON_MATCHES = [
    ("a", "b"), ("a.b", "aab"),
    ("a*", "a.b"), ("a*", "ab.c"), ("a*", "ba"), ("*a", "ab"),
    ("a.*", "ab"), ("a.*.c", "a.c"),
    ("a.**", "ab"), ("a.**", "abc"), ("a.**", "ab.c"), ("a.**", "ab.d.e"),
    ("**.a", "ba"), ("**.a", "c.ba"),
    ("a.{b,c}", "a.d"), ("a.{b,c}.**", "a.d"), ("a.{b,c}.**", "a.cd"),
    ("a.{b.**,c}", "a.c.d"),
    ("a.**.b", "a.xb"),
    ("frontend* api.**", "frontend.web"), ("frontend* api.**", "apis"),
    ("health*", "app.health"),
    ("a+b", "aab"), ("a(b)", "ab"),
]  # fmt: skip


@pytest.mark.parametrize(("pattern", "tag"), MATCHES)
def test_pattern_matches(pattern: str, tag: str) -> None:
    assert compile_match(pattern).match(tag)


@pytest.mark.parametrize(("pattern", "tag"), NON_MATCHES)
def test_pattern_does_not_match(pattern: str, tag: str) -> None:
    assert not compile_match(pattern).match(tag)


@pytest.mark.parametrize("pattern", ["a.{b,c", "a.b}", "", "   "])
def test_invalid_patterns_are_errors(pattern: str) -> None:
    with pytest.raises(PatternError):
        compile_match(pattern)


def test_first_matching_route_wins() -> None:
    router = Router([("app.web", "exact"), ("app.*", "wild"), ("**", "rest")])
    assert router.route("app.web") == "exact"
    assert router.route("app.db") == "wild"
    assert router.route("other") == "rest"


def test_unmatched_tag_routes_nowhere() -> None:
    route = TagCache(Router([("frontend*", "search")]).route)
    assert route("backend") is None
    assert route("backend") is None  # remembered misses stay misses


def test_the_tag_cache_is_bounded() -> None:
    route = TagCache(Router([("**", "all")]).route)
    for i in range(CACHE_LIMIT + 10):
        assert route(f"tag{i}") == "all"
    assert len(route) <= CACHE_LIMIT


def test_long_tags_are_routed_but_never_remembered() -> None:
    route = TagCache(Router([("big.**", "big"), ("**", "all")]).route)
    for i in range(100):
        assert route(f"big.{i}." + "x" * 1_000_000) == "big"
        assert route(f"other.{i}." + "x" * 10_000) == "all"
    assert len(route) == 0
    assert route("docker." + "f" * 64) == "all" and len(route) == 1
