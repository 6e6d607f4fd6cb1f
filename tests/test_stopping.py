"""The stop's timeline fits inside the platform's kill timer, in order."""

from __future__ import annotations

import pytest

from aggregator.config.model import Server
from aggregator.stopping import StopPlan


@pytest.mark.parametrize("stop_timeout", [2, 5, 30, 120])
@pytest.mark.parametrize("handoff", [False, True])
@pytest.mark.parametrize("secondary", [False, True])
def test_the_plan_is_ordered_and_ends_before_the_kill_timer(
    stop_timeout: float, handoff: bool, secondary: bool
) -> None:
    server = Server(stop_timeout=stop_timeout, drain_timeout=5)
    plan = StopPlan.make(server, 100.0, handoff=handoff, secondary=secondary)
    assert 100.0 < plan.drain_until <= plan.flush_until <= plan.handoff_until <= plan.end
    assert plan.end < 100.0 + stop_timeout
    supervisor_kills = StopPlan.supervisor_limit(server)
    assert plan.end - 100.0 < supervisor_kills < stop_timeout
    assert (plan.handoff_until > plan.flush_until) == handoff
    assert (plan.end > plan.handoff_until) == secondary


def test_ecs_default_leaves_most_of_the_time_to_delivery() -> None:
    plan = StopPlan.make(Server(), 0.0, handoff=True, secondary=True)
    assert plan.end == 27.0  # 30 s less the margin
    assert plan.drain_until == 5.0
    assert plan.flush_until >= 15.0  # retries get the bulk of the stop
