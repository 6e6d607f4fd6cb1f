"""A short run of the abuse harness against the real service: every attack lands, is counted
as what it is, and the honest senders lose nothing. No timing is asserted."""

from __future__ import annotations

from benchmarks import abuse


def test_a_short_abuse_run_counts_every_attack_and_loses_nothing() -> None:
    result = abuse.run(frames=2_000, duration=8, workers=1, tags=100)
    assert result.exit_status == 0, result.render()
    assert result.restarts == result.watchdog_kills == 0
    assert result.honest_sent > 0 and result.honest_lost == result.honest_duplicated == 0
    errors = result.input_errors
    assert errors["bad_event"] == 1_000  # the two kinds that no inject can encode, of four
    assert errors["message_timeout"] == 200 and errors["body_timeout"] == 50
    assert errors["message_too_large"] >= 6  # the gzip bombs and never-finished arrays
    assert result.tally["slowloris connections closed by the server"] == 200
    sent = result.tally["messages with 1 MiB tags sent"]
    assert sent == 100 and result.tally.get("messages with 1 MiB tags acked", 0) == 0
    assert result.long_tag_growth <= abuse.LONG_TAG_GROWTH_LIMIT
    assert not [name for name in result.tally if "failed" in name], result.render()
