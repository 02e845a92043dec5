"""Spreading new sessions over the pool: the choice table, and sessions bound one after another."""

from __future__ import annotations

from collections import Counter

import pytest
from responses_ws_bridge.core.account_pool import Candidate, Chosen, spread
from responses_ws_bridge.core.accounts import Account, AccountsConfig
from responses_ws_bridge.core.affinity import classify
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.rate_limits import RateLimits, Window


def candidate(
    id: str,
    *,
    headroom: float = 100.0,
    in_flight: int = 0,
    sessions: int = 0,
    last_chosen: int = 0,
) -> Candidate:
    return Candidate(id, headroom, in_flight, sessions, last_chosen)


@pytest.mark.parametrize(
    ("candidates", "winner"),
    [
        # 1. most headroom, whatever the rest says
        (
            [
                candidate("a", headroom=40, sessions=0),
                candidate("b", headroom=90, in_flight=3, sessions=9, last_chosen=7),
            ],
            "b",
        ),
        # 2. then fewest in flight
        ([candidate("a", in_flight=2), candidate("b", in_flight=1, sessions=5)], "b"),
        # 3. then fewest bound sessions
        ([candidate("a", sessions=4), candidate("b", sessions=3, last_chosen=9)], "b"),
        # 4. then the least recently chosen, never chosen first
        ([candidate("a", last_chosen=5), candidate("b", last_chosen=2)], "b"),
        ([candidate("a", last_chosen=5), candidate("b", last_chosen=0)], "b"),
    ],
)
def test_the_choice_table(candidates: list[Candidate], winner: str) -> None:
    for order in (candidates, candidates[::-1]):  # the criteria decide, not the order
        best = spread(order)
        assert best is not None and best.id == winner


def test_then_the_first_in_file_order() -> None:
    best = spread([candidate("a"), candidate("b"), candidate("c")])
    assert best is not None and best.id == "a"
    assert spread([]) is None


def pool_state(*ids: str) -> PoolState:
    state = PoolState(clock=lambda: 100.0)
    state.set_accounts(AccountsConfig(tuple(Account(i, f"tok-{i}") for i in ids)))
    return state


def new_hard_session(state: PoolState, n: int) -> str:
    """A new session's first request, as a turn runs it: choose, then bind its keys."""
    assert state.pool is not None
    affinity = classify([("session-id", f"s-{n}"), ("thread-id", f"t-{n}")], {})
    choice = state.pool.choose(sessions=state.bound_sessions())
    assert isinstance(choice, Chosen)
    state.bind(affinity, choice.account.id)
    return choice.account.id


def test_thirty_new_hard_sessions_bind_ten_to_each_of_three_accounts() -> None:
    state = pool_state("a", "b", "c")
    served = Counter(new_hard_session(state, n) for n in range(30))
    assert max(served.values()) - min(served.values()) <= 1, served
    assert served == {"a": 10, "b": 10, "c": 10}
    # Two keys a session (session-id, thread-id), counted once.
    assert state.bound_sessions() == {"a": 10, "b": 10, "c": 10}


def test_fewest_bound_sessions_wins_over_having_been_chosen_long_ago() -> None:
    state = pool_state("a", "b")
    assert state.pool is not None
    # Another instance bound three sessions to "b": counts from the shared store.
    assert state.pool.choose(sessions={"b": 3}) == Chosen(Account("a", "tok-a"))
    assert state.pool.choose(sessions={"a": 1, "b": 3}) == Chosen(Account("a", "tok-a"))


def test_unbound_requests_take_turns() -> None:
    state = pool_state("a", "b", "c")
    assert state.pool is not None
    picks = []
    for _ in range(6):
        choice = state.pool.choose(sessions=state.bound_sessions())
        assert isinstance(choice, Chosen)
        picks.append(choice.account.id)
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_soft_sessions_count_and_move_with_their_key() -> None:
    state = pool_state("a", "b")
    soft = classify([], {"prompt_cache_key": "p"})
    state.bind(soft, "a")
    assert state.bound_sessions() == {"a": 1}
    state.bind(soft, "b")  # served elsewhere after a failure: the key moved
    assert state.bound_sessions() == {"b": 1}


def test_a_chain_of_responses_is_not_a_session_per_turn() -> None:
    state = pool_state("a", "b")
    for n in range(3):
        state.bind(classify([], {"previous_response_id": f"resp_{n}"}), "a")
    assert state.bound_sessions() == {}


def test_expired_bindings_stop_counting() -> None:
    now = [100.0]
    state = PoolState(binding_ttl_s=60.0, clock=lambda: now[0])
    state.set_accounts(AccountsConfig((Account("a", "tok-a"), Account("b", "tok-b"))))
    state.bind(classify([("session-id", "old")], {}), "a")
    now[0] += 30
    state.bind(classify([("session-id", "new")], {}), "b")
    assert state.bound_sessions() == {"a": 1, "b": 1}
    now[0] += 31  # "old" idle past its TTL
    assert state.bound_sessions() == {"b": 1}


def figures(used: float) -> RateLimits:
    # No reset time: the window never reads as reset, whatever the wall clock says.
    return RateLimits(Window(used, 300))


def test_with_figures_the_most_headroom_still_wins() -> None:
    state = pool_state("a", "b", "c")
    pool = state.pool
    assert pool is not None
    pool.record_rate_limits("a", figures(30))
    pool.record_rate_limits("b", figures(10))
    pool.record_rate_limits("c", figures(60))
    served = Counter(new_hard_session(state, n) for n in range(9))
    # "b" keeps the most headroom however many sessions it holds: the figures decide.
    assert served == {"b": 9}
    pool.record_rate_limits("b", figures(35))
    assert new_hard_session(state, 9) == "a"
