"""Each filter on its own, as Fluentd runs it: record_transformer, grep, parser, concat."""

from __future__ import annotations

import time
from typing import Any

import pytest

from aggregator.config.model import Concat as ConcatSettings
from aggregator.config.model import Grep as GrepSettings
from aggregator.config.model import Parser as ParserSettings
from aggregator.config.model import RecordTransformer as RTSettings
from aggregator.filters import FilterChain
from aggregator.filters import concat as concat_module
from aggregator.filters.concat import Concat
from aggregator.filters.grep import Grep
from aggregator.filters.parser import Parser
from aggregator.filters.record_transformer import RecordTransformer, time_text
from aggregator.metrics import REGISTRY

T = 1700000000


def rt(**settings: Any) -> RecordTransformer:
    return RecordTransformer(RTSettings(type="record_transformer", match="**", **settings), "rt")


def test_record_transformer_placeholders_keep_their_types_when_alone() -> None:
    f = rt(record={
        "service": "${tag_parts[1]}", "last": "${tag_parts[-1]}", "prefix": "${tag_prefix[1]}",
        "suffix": "${tag_suffix[-2]}", "tag": "${tag}", "n": "${record[\"n\"]}",
        "text": "n=${record[\"n\"]} m=${record[\"missing\"]}!", "missing": "${record[\"nope\"]}",
        "nested": '{"t": "${tag}", "list": [1, "${tag_parts[0]}"]}', "at": "${time}",
        "${tag_parts[0]}_key": "v",
    }, remove_keys=["drop"])  # fmt: skip
    [[t, record]] = f.run("k8s.payments.api", [[T, {"n": 7, "drop": 1, "keep": "x"}]])
    assert t == T and record == {
        "n": 7, "keep": "x", "service": "payments", "last": "api", "prefix": "k8s.payments",
        "suffix": "payments.api", "tag": "k8s.payments.api", "text": "n=7 m=!",
        "missing": None, "nested": {"t": "k8s.payments.api", "list": [1, "k8s"]},
        "at": time_text(T), "k8s_key": "v",
    }  # fmt: skip


def test_record_transformer_renews_and_keeps_and_renews_time() -> None:
    f = rt(renew_record=True, keep_keys=["a"], record={"b": "${record[\"a\"]}", "t": "12.5"},
           renew_time_key="t", auto_typecast=False)  # fmt: skip
    [[t, record]] = f.run("x", [[T, {"a": 1, "z": 2}]])
    assert record == {"a": 1, "b": "1", "t": "12.5"} and t == 12.5


def grep(**settings: Any) -> Grep:
    return Grep(GrepSettings.model_validate({"type": "grep", "match": "**", **settings}), "g")


def test_grep_regexp_exclude_and_or_as_fluentd_combines_them() -> None:
    events = [[T, {"level": lvl, "msg": msg}] for lvl, msg in
              [("error", "disk"), ("info", "ok"), ("error", "healthcheck"), ("warn", "disk")]]
    kept = grep(regexp=[{"key": "level", "pattern": "/^(error|warn)$/"}],
                exclude=[{"key": "msg", "pattern": "health"}]).run("t", events)  # fmt: skip
    assert [e[1]["msg"] for e in kept] == ["disk", "disk"]
    either = grep(**{"or": [{"regexp": [{"key": "level", "pattern": "info"},
                                        {"key": "msg", "pattern": "health"}]}]})  # fmt: skip
    assert [e[1]["msg"] for e in either.run("t", events)] == ["ok", "healthcheck"]
    both = grep(**{"and": [{"exclude": [{"key": "level", "pattern": "error"},
                                        {"key": "msg", "pattern": "disk"}]}]})  # fmt: skip
    assert [e[1]["msg"] for e in both.run("t", events)] == ["ok", "healthcheck", "disk"]
    nested = grep(regexp=[{"key": "$.k.n", "pattern": "^5$"}])
    assert len(nested.run("t", [[T, {"k": {"n": 5}}], [T, {"k": {"n": 6}}], [T, {}]])) == 1


def parser(**settings: Any) -> Parser:
    return Parser(ParserSettings.model_validate({"type": "parser", "match": "**",
                                                 "key_name": "log", **settings}), "p")  # fmt: skip


def test_parser_json_takes_the_time_key_and_replaces_the_record() -> None:
    [[t, record]] = parser().run("t", [[T, {"log": '{"a": 1, "time": 1700000123.5}', "x": 1}]])
    assert record == {"a": 1} and t == pytest.approx(1700000123.5)
    before = time.time()
    [[t, _]] = parser().run("t", [[T, {"log": '{"a": 1}'}]])
    assert t >= before  # no time key: the time of parsing, as Fluentd's estimate_current_event
    [[t, _]] = parser(reserve_time=True).run("t", [[T, {"log": '{"a": 1}'}]])
    assert t == T


def test_parser_options_and_invalid_records() -> None:
    bad = [[T, {"log": "{not json", "x": 1}]]
    assert parser().run("t", bad) == []  # to Fluentd's @ERROR: dropped, counted
    assert parser(reserve_data=True).run("t", bad) == bad
    kept = parser(reserve_data=True, hash_value_field="parsed", inject_key_prefix="p_",
                  remove_key_name_field=True).run("t", [[T, {"log": '{"a": 1}', "x": 2}]])
    assert kept[0][1] == {"x": 2, "parsed": {"p_a": 1}}
    assert parser(reserve_data=True, hash_value_field="h").run("t", bad)[0][1] == {
        "log": "{not json", "x": 1, "h": {}}  # fmt: skip


def test_parser_regexp_named_groups() -> None:
    p = parser(parse={"type": "regexp",
                      "expression": r"/^(?<host>\S+) (?<code>\d+) (?<time>\S+)$/"})  # fmt: skip
    [[t, record]] = p.run("t", [[T, {"log": "web1 503 2023-11-14T22:13:20Z"}]])
    assert record == {"host": "web1", "code": "503"} and t == 1700000000.0
    assert p.run("t", [[T, {"log": "no match"}]]) == []


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def concat(clock: Clock | None = None, **settings: Any) -> Concat:
    s = ConcatSettings.model_validate({"type": "concat", "match": "**", "key": "log", **settings})
    return Concat(s, "c", clock or Clock())


def docker_part(text: str, pid: str, ordinal: int, last: bool) -> list[Any]:
    return [T + ordinal, {"log": text, "container_id": "c1", "partial_message": "true",
                          "partial_id": pid, "partial_ordinal": str(ordinal),
                          "partial_last": "true" if last else "false"}]  # fmt: skip


def test_concat_joins_docker_partials_in_their_order() -> None:
    f = concat(use_partial_metadata=True, separator="")
    assert f.run("d", [docker_part("bb", "p1", 2, False)]) == []
    assert f.run("d", [docker_part("aa", "p1", 1, False), [T, {"log": "alone"}]]) == [
        [T, {"log": "alone"}]]  # fmt: skip
    [[t, record]] = f.run("d", [docker_part("cc", "p1", 3, True)])
    assert record == {"log": "aabbcc", "container_id": "c1"} and t == T + 3
    assert not f.holding


def test_concat_lets_an_incomplete_line_go_after_flush_interval() -> None:
    clock = Clock()
    f = concat(clock, use_partial_metadata=True, separator="", flush_interval=5)
    f.run("d", [docker_part("half", "p9", 1, False)])
    assert f.expired() == []
    clock.now += 6
    [(tag, [_, record])] = f.expired()
    assert tag == "d" and record["log"] == "half" and record["partial_id"] == "p9"
    assert not f.holding


def test_concat_holds_at_most_its_bytes_and_streams_then_lets_the_oldest_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(concat_module, "MAX_HELD_BYTES", 1000)
    monkeypatch.setattr(concat_module, "MAX_STREAMS", 3)
    f = concat(use_partial_metadata=True, separator="")
    for i in range(3):  # three lines begun, 400 bytes each: the first goes past 1000 bytes
        f.run("d", [docker_part("x" * 400, f"p{i}", 1, False)])
    [(_, [_, first])] = f.expired()
    assert first["partial_id"] == "p0" and len(first["log"]) == 400
    assert REGISTRY.get_sample_value("aggregator_filter_held_bytes", {"filter": "c"}) == 800
    for i in range(3, 6):  # more streams than MAX_STREAMS: the oldest go
        f.run("d", [docker_part("y", f"p{i}", 1, False)])
    assert [r["partial_id"] for _, (_, r) in f.expired()] == ["p1", "p2"]
    assert len(f.drain()) == 3 and not f.holding
    assert REGISTRY.get_sample_value("aggregator_filter_held_bytes", {"filter": "c"}) == 0


def test_concat_multiline_and_n_lines() -> None:
    f = concat(multiline_start_regexp=r"/^\d{4}-/")
    lines = ["2024-01 boom", "  at a", "  at b", "2024-02 next"]
    out = f.run("j", [[T, {"log": line}] for line in lines])
    assert [r["log"] for _, r in out] == ["2024-01 boom\n  at a\n  at b"]
    [(_, [_, last])] = f.drain()
    assert last["log"] == "2024-02 next"
    pairs = concat(n_lines=2, separator=" ")
    out = pairs.run("j", [[T, {"log": str(i)}] for i in range(5)])
    assert [r["log"] for _, r in out] == ["0 1", "2 3"]


def test_a_chain_lets_entries_that_are_not_pairs_through_untouched_for_the_formatter() -> None:
    """What a sender's Forward or PackedForward message may hold besides ``[time, record]``
    never reaches a filter (they index it): it follows the filtered events, to be counted."""
    chain = FilterChain([
        grep(exclude=[{"key": "drop", "pattern": "/yes/"}]), rt(record={"t": "${tag}"}),
        Concat(ConcatSettings(type="concat", match="**", key="log", use_partial_metadata=True),
               "c"),
    ])  # fmt: skip
    entries: list[Any] = [5, [T, {"i": 0}], None, [T], (T, {"i": 1}), [T, {"drop": "yes"}], "x"]
    out = chain.run("app", entries)
    assert out == [[T, {"i": 0, "t": "app"}], (T, {"i": 1, "t": "app"}), 5, None, [T], "x"]
    assert chain.run("app", [7]) == [7] and chain.run("app", []) == []
