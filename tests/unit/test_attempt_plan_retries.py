"""The retry loop's state: free retries once each, and starting over after every account failed."""

from __future__ import annotations

import pytest
from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.attempt_plan import AttemptPlan, PickAny, PickOwner
from responses_ws_bridge.core.failures import (
    Failure,
    HandshakeRejected,
    UpstreamClosed,
    UpstreamErrorEvent,
)
from responses_ws_bridge.core.retry_policy import RetryOther, RetrySame

C1000 = UpstreamClosed(1000)
C1011 = UpstreamClosed(1011)
AGE = UpstreamErrorEvent("websocket_connection_limit_reached", 400)


def fail(plan: AttemptPlan, account: str, failure: Failure) -> object:
    plan.picked(account)
    return plan.decide(
        failure, account=account, client_has_seen_event=False, owner_usable=True, jitter=0.0
    )


@pytest.mark.parametrize("failure", [C1000, AGE])
def test_a_free_retry_stays_on_the_account_costs_nothing_and_comes_once(failure: Failure) -> None:
    plan = AttemptPlan(AffinityKind.SOFT, owner=None, pooled=True, retry_budget=0)
    plan.picked("team-a")
    why = plan.retry_for_free(failure, account="team-a", reused=False, client_has_seen_event=False)
    assert why is not None
    assert plan.attempts == 0
    assert plan.next_pick() == PickOwner("team-a")
    plan.picked("team-a")
    again = plan.retry_for_free(
        failure, account="team-a", reused=False, client_has_seen_event=False
    )
    assert again is None


def test_soft_starts_over_on_the_first_account_after_every_one_failed() -> None:
    plan = AttemptPlan(AffinityKind.SOFT, owner=None, pooled=True, retry_budget=2)
    assert fail(plan, "team-a", C1011) == RetryOther("team-a")
    assert fail(plan, "team-b", HandshakeRejected(503)) == RetryOther("team-b")
    assert plan.next_pick() == PickAny(frozenset({"team-a", "team-b"}), None)
    again = plan.start_over(jitter=0.0)
    assert again == RetrySame("team-a", 0.25)
    assert plan.next_pick() == PickOwner("team-a")
    # The budget is spent now: no second start.
    assert fail(plan, "team-a", C1011) is not None
    assert plan.start_over(jitter=0.0) is None


@pytest.mark.parametrize(
    ("kind", "failures", "budget"),
    [
        (AffinityKind.SOFT, [C1011, HandshakeRejected(401)], 2),  # one was not transient
        (AffinityKind.SOFT, [C1011, C1011], 1),  # no budget left
        (AffinityKind.NONE, [], 2),  # nothing failed
    ],
)
def test_no_start_over(kind: AffinityKind, failures: list[Failure], budget: int) -> None:
    plan = AttemptPlan(kind, owner=None, pooled=True, retry_budget=budget)
    for account, failure in zip(["team-a", "team-b"], failures, strict=False):
        fail(plan, account, failure)
    assert plan.start_over(jitter=0.0) is None


def test_hard_never_starts_over() -> None:
    plan = AttemptPlan(AffinityKind.HARD, owner="team-a", pooled=True, retry_budget=2)
    plan.exclusions.append(("team-a", True))  # cannot happen; even so, hard stays put
    assert plan.start_over(jitter=0.0) is None
    assert plan.next_pick() == PickOwner("team-a")
