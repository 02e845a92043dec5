"""The retry loop's state, walked as tables: where each attempt goes, and what a failure does."""

from __future__ import annotations

import pytest
from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.attempt_plan import AttemptPlan, Pick, PickAny, PickClient, PickOwner
from responses_ws_bridge.core.failures import (
    ConnectFailed,
    ConnectionLost,
    Failure,
    HandshakeRejected,
    UpstreamClosed,
    UpstreamErrorEvent,
)
from responses_ws_bridge.core.retry_policy import (
    FailHttp,
    FailStreamIncomplete,
    Relay,
    RetryOther,
    RetrySame,
)

HARD, SOFT, NONE = AffinityKind.HARD, AffinityKind.SOFT, AffinityKind.NONE
C1000, C1011 = UpstreamClosed(1000), UpstreamClosed(1011)
H401, H429 = HandshakeRejected(401), HandshakeRejected(429, retry_after_s=9.0)
NOTHING: frozenset[str] = frozenset()


def plan(kind: AffinityKind, owner: str | None, *, pooled: bool = True) -> AttemptPlan:
    return AttemptPlan(kind, owner=owner, pooled=pooled, retry_budget=2)


@pytest.mark.parametrize(
    ("kind", "owner", "pooled", "first"),
    [
        (HARD, "a", True, PickOwner("a")),
        (HARD, None, True, PickAny(NOTHING, None)),
        (SOFT, "a", True, PickAny(NOTHING, "a")),
        (SOFT, None, True, PickAny(NOTHING, None)),
        (NONE, None, True, PickAny(NOTHING, None)),
        (HARD, None, False, PickClient()),
        (SOFT, None, False, PickClient()),
    ],
)
def test_first_pick(kind: AffinityKind, owner: str | None, pooled: bool, first: Pick) -> None:
    assert plan(kind, owner, pooled=pooled).next_pick() == first


@pytest.mark.parametrize(
    ("kind", "owner", "account", "binds", "then"),
    [
        # The first request of a hard key binds it to whatever served, before any retry.
        (HARD, None, "b", True, PickOwner("b")),
        (HARD, "a", "a", False, PickOwner("a")),
        (SOFT, None, "b", False, PickAny(NOTHING, None)),
        (NONE, None, "b", False, PickAny(NOTHING, None)),
        (HARD, None, None, False, PickClient()),  # pass-through: nothing to bind
    ],
)
def test_picked_binds_only_a_new_hard_key(
    kind: AffinityKind, owner: str | None, account: str | None, binds: bool, then: Pick
) -> None:
    p = plan(kind, owner, pooled=account is not None)
    assert p.picked(account) is binds
    assert p.attempts == 1
    assert p.next_pick() == then


@pytest.mark.parametrize(
    ("kind", "pooled", "failure", "decision_type", "then"),
    [
        # HARD: every retry on the owner, after 1011 as after any other close.
        (HARD, True, C1011, RetrySame, PickOwner("a")),
        (HARD, True, C1000, RetrySame, PickOwner("a")),
        (HARD, True, H401, FailHttp, PickOwner("a")),
        (HARD, True, H429, FailHttp, PickOwner("a")),
        # SOFT/NONE: a 1011 or a rejection leaves the account out; other closes stay on it.
        (SOFT, True, C1011, RetryOther, PickAny(frozenset({"a"}), None)),
        (NONE, True, H401, RetryOther, PickAny(frozenset({"a"}), None)),
        (SOFT, True, C1000, RetrySame, PickOwner("a")),
        (NONE, True, ConnectionLost(), RetrySame, PickOwner("a")),
        # Pass-through has one credential: "another account" means the request fails.
        (SOFT, False, C1011, FailHttp, PickClient()),
        (NONE, False, C1000, RetrySame, PickClient()),
        (NONE, True, UpstreamErrorEvent("invalid_request_error", 400), Relay, PickOwner("a")),
    ],
)
def test_a_failure_moves_the_plan_as_the_decision_says(
    kind: AffinityKind, pooled: bool, failure: Failure, decision_type: type, then: Pick
) -> None:
    p = plan(kind, "a" if pooled else None, pooled=pooled)
    p.picked("a" if pooled else None)
    decision = p.decide(
        failure,
        account="a" if pooled else None,
        client_has_seen_event=False,
        owner_usable=True,
        jitter=0.0,
    )
    assert isinstance(decision, decision_type)
    if decision_type in (RetrySame, RetryOther):
        assert p.next_pick() == then
    if kind is HARD:
        assert p.excluded == set()


def test_after_an_event_nothing_is_retried() -> None:
    p = plan(SOFT, "a")
    p.picked("a")
    decision = p.decide(C1011, account="a", client_has_seen_event=True, owner_usable=True, jitter=0)
    assert decision == FailStreamIncomplete(1011)


@pytest.mark.parametrize(
    ("failure", "reused", "seen", "free"),
    [
        (C1011, True, False, True),
        (ConnectionLost(), True, False, True),
        (C1011, False, False, False),  # a fresh socket's failure counts
        (C1011, True, True, False),  # the client saw events: nothing is replayed
        (H401, True, False, False),  # not a dead socket
        (ConnectFailed("refused"), True, False, False),
    ],
)
def test_a_dead_reused_socket_is_retried_once_for_free(
    failure: Failure, reused: bool, seen: bool, free: bool
) -> None:
    p = plan(SOFT, None)
    p.picked("b")
    got = p.retry_for_free(failure, account="b", reused=reused, client_has_seen_event=seen)
    assert (got is not None) is free
    if free:
        assert p.attempts == 0 and p.next_pick() == PickOwner("b")
        # Only once per request.
        p.picked("b")
        assert not p.retry_for_free(failure, account="b", reused=True, client_has_seen_event=False)


def test_soft_walks_the_pool_then_fails_when_the_budget_is_spent() -> None:
    p = plan(SOFT, None)
    for account, excluded in (("a", {"a"}), ("b", {"a", "b"})):
        p.picked(account)
        decision = p.decide(
            C1011, account=account, client_has_seen_event=False, owner_usable=True, jitter=0
        )
        assert decision == RetryOther(account)
        assert p.next_pick() == PickAny(frozenset(excluded), None)
    p.picked("c")
    decision = p.decide(
        C1011, account="c", client_has_seen_event=False, owner_usable=True, jitter=0
    )
    assert decision == FailHttp(502, "upstream_closed")


ALL = [
    C1000,
    C1011,
    UpstreamClosed(1011, by_bridge=True),
    ConnectionLost(),
    ConnectFailed("refused"),
    H401,
    H429,
    HandshakeRejected(503),
    UpstreamErrorEvent("rate_limit_exceeded", 429),
    UpstreamErrorEvent("invalid_request_error", 400),
]


@pytest.mark.parametrize("failure", ALL, ids=repr)
def test_hard_stays_pinned_on_its_owner_through_every_attempt(failure: Failure) -> None:
    for usable in (True, False):
        p = plan(HARD, None)
        p.picked("owner")
        for _ in range(4):
            p.decide(
                failure, account="owner", client_has_seen_event=False, owner_usable=usable, jitter=0
            )
            assert p.next_pick() == PickOwner("owner")
            assert p.excluded == set()
            p.picked("owner")
