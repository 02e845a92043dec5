"""The account pool: selection, health rules with an injected clock, reload, operator rows."""

from __future__ import annotations

import json
from typing import Any

import pytest
from responses_ws_bridge.core.account_pool import (
    AccountPool,
    AccountRow,
    AllCoolingDown,
    Chosen,
    Cooling,
    Disabled,
    HealthRules,
    Healthy,
    NoneUsable,
    fail_http_for_choice,
)
from responses_ws_bridge.core.accounts import Account, AccountsConfig
from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.failures import (
    ConnectionLost,
    HandshakeRejected,
    UpstreamClosed,
    UpstreamErrorEvent,
)
from responses_ws_bridge.core.rate_limits import RateLimits, Window
from responses_ws_bridge.core.retry_policy import FailHttp, handshake_rejected
from responses_ws_bridge.core.upstream_events import parse_error_event
from responses_ws_bridge.local.response_events import error_event, rate_limit_event

WALL = 1_800_000_000.0


def error_failure(event: dict[str, Any]) -> UpstreamErrorEvent:
    parsed = parse_error_event(json.dumps(event), wall_now=WALL)
    assert parsed is not None
    return parsed


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(*ids: str) -> AccountsConfig:
    return AccountsConfig(accounts=tuple(Account(i, f"secret-{i}") for i in ids))


def pool(*ids: str, clock: Clock | None = None) -> tuple[AccountPool, Clock]:
    clock = clock or Clock()
    return AccountPool(config(*ids), clock=clock), clock


def chosen(choice: object) -> str:
    assert isinstance(choice, Chosen), choice
    return choice.account.id


# --- selection ------------------------------------------------------------------------------


def test_fewest_in_flight_wins_ties_go_to_the_least_recently_chosen() -> None:
    p, _ = pool("a", "b", "c")
    assert chosen(p.choose()) == "a"  # none chosen yet: file order
    p.acquire("a")
    assert chosen(p.choose()) == "b"
    p.acquire("b")
    p.acquire("c")
    assert chosen(p.choose()) == "c"  # one in flight each; "c" was never chosen
    p.acquire("c")
    assert chosen(p.choose()) == "a"  # "a" and "b" tie at one; "a" was chosen longer ago
    p.acquire("a")
    assert chosen(p.choose()) == "b"
    p.release("a")
    p.release("a")
    assert chosen(p.choose()) == "a"


def test_preferred_account_when_usable_even_if_busier() -> None:
    p, _ = pool("a", "b")
    p.acquire("b")
    p.acquire("b")
    assert chosen(p.choose(prefer="b")) == "b"
    p.record_failure("b", HandshakeRejected(429))
    assert chosen(p.choose(prefer="b")) == "a"
    assert chosen(p.choose(prefer="gone")) == "a"


def test_exclude() -> None:
    p, _ = pool("a", "b", "c")
    assert chosen(p.choose(exclude={"a"})) == "b"
    assert chosen(p.choose(exclude={"a", "b"}, prefer="a")) == "c"
    assert p.choose(exclude={"a", "b", "c"}) == NoneUsable("excluded")


def test_all_cooling_down_reports_the_earliest_return() -> None:
    p, clock = pool("a", "b")
    p.record_failure("a", HandshakeRejected(429, retry_after_s=30.5))
    p.record_failure("b", HandshakeRejected(429, retry_after_s=90.0))
    assert p.choose() == AllCoolingDown(until=130.5, retry_after_s=31)
    clock.now = 130.4
    assert p.choose() == AllCoolingDown(until=130.5, retry_after_s=1)
    clock.now = 130.5
    assert chosen(p.choose()) == "a"


def test_all_disabled_is_none_usable() -> None:
    p, _ = pool("a", "b")
    p.record_failure("a", HandshakeRejected(401))
    p.record_failure("b", HandshakeRejected(403))
    assert p.choose() == NoneUsable("disabled")
    # Disabled accounts are not "cooling": one cooling account is enough for a 429.
    p2, _ = pool("a", "b")
    p2.record_failure("a", HandshakeRejected(401))
    p2.record_failure("b", HandshakeRejected(429))
    assert p2.choose() == AllCoolingDown(until=160.0, retry_after_s=60)


def test_excluded_rest_disabled_is_reported_as_excluded() -> None:
    p, _ = pool("a", "b")
    p.record_failure("b", HandshakeRejected(401))
    assert p.choose(exclude={"a"}) == NoneUsable("excluded")


def test_choose_owner_never_returns_another_account() -> None:
    p, clock = pool("a", "b")
    assert chosen(p.choose_owner("b")) == "b"
    p.record_failure("b", HandshakeRejected(429, retry_after_s=5.0))
    assert p.choose_owner("b") == AllCoolingDown(until=105.0, retry_after_s=5, owner="b")
    clock.now = 105.0
    assert chosen(p.choose_owner("b")) == "b"
    p.record_failure("b", HandshakeRejected(403))
    assert p.choose_owner("b") == NoneUsable("disabled", owner="b")
    assert p.choose_owner("zzz") == NoneUsable("removed", owner="zzz")


# --- health ---------------------------------------------------------------------------------


def test_handshake_401_403_disable_until_reload() -> None:
    p, clock = pool("a", "b")
    assert p.record_failure("a", HandshakeRejected(401)) == Disabled(
        "upstream rejected the WebSocket handshake with HTTP 401"
    )
    clock.now += 10_000
    assert not p.is_usable("a")
    p.record_success("a")  # an older socket finishing does not re-enable it
    assert not p.is_usable("a")
    # Nothing else overrides a disabled state.
    assert isinstance(p.record_failure("a", HandshakeRejected(429)), Disabled)
    assert p.reload(config("a", "b")) == []
    assert p.is_usable("a")


def test_429_cooldown_honours_retry_after_and_expires() -> None:
    p, clock = pool("a")
    failure = handshake_rejected(429, [("Retry-After", "20")], b"", wall_now=WALL)
    assert p.record_failure("a", failure) == Cooling(
        120.0, "upstream rejected the WebSocket handshake with HTTP 429"
    )
    clock.now = 119.9
    assert not p.is_usable("a")
    clock.now = 120.0
    assert p.is_usable("a")
    assert p.health("a") == Healthy()


@pytest.mark.parametrize(
    ("body", "seconds"),
    [
        (b'{"error": {"code": "usage_limit_reached", "resets_in_seconds": 300}}', 300.0),
        (b'{"error": {"resets_at": 1800000045}}', 45.0),
        (b'{"error": {"retry_after": 12}}', 12.0),
        (b'{"error": {"message": "Rate limited"}}', 60.0),  # nothing said: the default
        (b"", 60.0),
    ],
)
def test_429_cooldown_from_the_error_body(body: bytes, seconds: float) -> None:
    p, _ = pool("a")
    failure = handshake_rejected(429, [], body, wall_now=WALL)
    health = p.record_failure("a", failure)
    assert isinstance(health, Cooling)
    assert health.until == pytest.approx(100.0 + seconds)


def test_rate_limit_error_events_cool_down() -> None:
    p, _ = pool("a", "b", "c")
    assert p.record_failure("a", error_failure(rate_limit_event(7))) == (
        Cooling(107.0, "upstream error event rate_limit_exceeded")
    )
    usage = error_event(429, "usage_limit_reached", "The usage limit has been reached")
    usage["error"]["resets_at"] = WALL + 3600
    health = p.record_failure("b", error_failure(usage))
    assert isinstance(health, Cooling)
    assert health.until == pytest.approx(3700.0)
    # A non-rate-limit error event says nothing about the account.
    assert p.record_failure("c", UpstreamErrorEvent("invalid_request_error", 400)) == Healthy()


def test_a_shorter_cooldown_does_not_shorten_a_longer_one() -> None:
    p, _ = pool("a")
    p.record_failure("a", HandshakeRejected(429, retry_after_s=600.0))
    health = p.record_failure("a", HandshakeRejected(429, retry_after_s=5.0))
    assert isinstance(health, Cooling)
    assert health.until == 700.0
    health = p.record_failure("a", HandshakeRejected(429, retry_after_s=900.0))
    assert isinstance(health, Cooling)
    assert health.until == 1000.0


def test_faults_that_are_most_recent_attempts_give_a_short_cooldown() -> None:
    p, clock = pool("a")
    for failure in (UpstreamClosed(1011), HandshakeRejected(502), UpstreamClosed(1011)):
        assert p.record_failure("a", failure) == Healthy()
        clock.now += 5
    p.record_success("a")  # 3 faults of 4: not enough samples yet
    clock.now += 5
    assert p.record_failure("a", UpstreamClosed(1011)) == Cooling(130.0, "repeated upstream errors")
    clock.now = 130.0
    assert p.is_usable("a")
    # The samples were spent by that cooldown: one more fault alone does not cool again.
    assert p.record_failure("a", UpstreamClosed(1011)) == Healthy()


def test_a_few_faults_among_many_successes_are_noise() -> None:
    # Three 1011s used to cool an account for 10 s: under load that moved its
    # traffic onto the others until every account was cooling.
    p, clock = pool("a")
    for i in range(300):
        clock.now += 0.1
        if i % 50 == 0:
            assert p.record_failure("a", UpstreamClosed(1011)) == Healthy()
        else:
            p.record_success("a")
    assert p.is_usable("a")


def test_faults_spread_beyond_the_window_do_not_add_up() -> None:
    p, clock = pool("a")
    for _ in range(10):
        assert p.record_failure("a", UpstreamClosed(1011)) == Healthy()
        clock.now += 16  # at most four outcomes within any 60 s
    assert p.is_usable("a")


def test_reset_times_are_clamped_to_seven_days() -> None:
    p, _ = pool("a")
    health = p.record_failure("a", HandshakeRejected(429, retry_after_s=10.0**12))
    assert isinstance(health, Cooling) and health.until == 100.0 + 7 * 24 * 3600


def test_is_current_after_a_reload() -> None:
    p, _ = pool("a", "b")
    a, b = p.account("a"), p.account("b")
    assert a is not None and b is not None
    p.reload(AccountsConfig(accounts=(Account("a", "rotated"), b)))
    assert not p.is_current(a)  # same id, another credential
    assert p.is_current(b)
    p.reload(AccountsConfig(accounts=(Account("a", "rotated"),)))
    assert not p.is_current(b)


@pytest.mark.parametrize(
    "failure",
    [
        UpstreamClosed(1000),
        UpstreamClosed(1001),
        UpstreamClosed(1006),
        UpstreamClosed(1012),
        UpstreamClosed(1013),
        ConnectionLost(),
        HandshakeRejected(404),
        HandshakeRejected(426),
    ],
    ids=repr,
)
def test_other_failures_do_not_affect_health(failure: HandshakeRejected | UpstreamClosed) -> None:
    p, _ = pool("a")
    for _ in range(5):
        assert p.record_failure("a", failure) == Healthy()


def test_successes_dilute_faults_and_clear_a_cooldown() -> None:
    p, _ = pool("a")
    for _ in range(2):
        p.record_failure("a", UpstreamClosed(1011))
    for _ in range(4):
        p.record_success("a")
    assert p.record_failure("a", UpstreamClosed(1011)) == Healthy()  # 3 of 7
    p.record_failure("a", HandshakeRejected(429))
    p.record_success("a")
    assert p.is_usable("a")


def test_custom_rules() -> None:
    clock = Clock()
    rules = HealthRules(rate_limit_default_s=5.0, fault_min_samples=1, fault_cooldown_s=2.0)
    p = AccountPool(config("a", "b"), clock=clock, rules=rules)
    assert p.record_failure("a", HandshakeRejected(429)) == Cooling(
        105.0, "upstream rejected the WebSocket handshake with HTTP 429"
    )
    assert p.record_failure("b", UpstreamClosed(1011)) == Cooling(102.0, "repeated upstream errors")


# --- reload and removal ---------------------------------------------------------------------


def test_reload_keeps_state_of_accounts_that_stay() -> None:
    p, _ = pool("a", "b", "c")
    p.acquire("a")
    p.record_success("a")
    p.record_failure("b", HandshakeRejected(429, retry_after_s=50.0))
    removed = p.reload(config("c", "b", "a", "d"))
    assert removed == []
    assert p.ids == ["c", "b", "a", "d"]  # the new file's order
    rows = {row.id: row for row in p.snapshot()}
    assert (rows["a"].in_flight, rows["a"].served) == (1, 1)
    assert rows["b"].cooldown_until == 150.0
    assert rows["d"] == AccountRow("d", "healthy", 0, None, None, 0)


def test_reload_with_a_changed_credential_starts_afresh_but_keeps_in_flight() -> None:
    p, _ = pool("a")
    p.acquire("a")
    p.record_success("a")
    p.record_failure("a", HandshakeRejected(429))
    p.reload(AccountsConfig(accounts=(Account("a", "new-secret"),)))
    assert p.is_usable("a")
    assert p.snapshot() == [AccountRow("a", "healthy", 1, None, None, 0)]
    account = p.account("a")
    assert account is not None and account.bearer == "new-secret"
    p.release("a")  # the request that was running still balances
    assert p.snapshot()[0].in_flight == 0


def test_reload_with_a_changed_upstream_or_chatgpt_account_counts_as_a_new_credential() -> None:
    p, _ = pool("a", "b")
    p.record_failure("a", HandshakeRejected(429))
    p.record_failure("b", HandshakeRejected(429))
    p.reload(
        AccountsConfig(
            accounts=(
                Account("a", "secret-a", upstream="ws://127.0.0.1:1/v1/responses"),
                Account("b", "secret-b", chatgpt_account_id="acct"),
            )
        )
    )
    assert p.is_usable("a") and p.is_usable("b")


def test_removed_accounts_are_reported_and_forgotten() -> None:
    p, _ = pool("a", "b", "c")
    p.acquire("b")
    assert p.reload(config("a")) == ["b", "c"]
    assert p.ids == ["a"]
    assert p.account("b") is None
    assert p.health("b") is None
    assert not p.is_usable("b")
    # Requests still running on a removed account finish without effect.
    p.release("b")
    p.record_success("b")
    assert p.record_failure("b", UpstreamClosed(1011)) is None
    assert chosen(p.choose(prefer="b")) == "a"
    assert [row.id for row in p.snapshot()] == ["a"]


def test_release_never_goes_negative() -> None:
    p, _ = pool("a")
    p.release("a")
    p.acquire("a")
    assert p.snapshot()[0].in_flight == 1
    p.release("a")
    p.release("a")
    assert p.snapshot()[0].in_flight == 0


# --- operator view and client errors --------------------------------------------------------


def test_snapshot_rows() -> None:
    p, clock = pool("a", "b", "c")
    p.acquire("a")
    p.record_success("a")
    p.record_success("a")
    p.record_failure("b", HandshakeRejected(429, retry_after_s=40.0))
    p.record_failure("c", HandshakeRejected(401))
    clock.now = 110.0
    assert p.snapshot() == [
        AccountRow("a", "healthy", 1, None, None, 2),
        AccountRow(
            "b",
            "cooling: upstream rejected the WebSocket handshake with HTTP 429",
            0,
            140.0,
            30.0,
            0,
        ),
        AccountRow(
            "c",
            "disabled: upstream rejected the WebSocket handshake with HTTP 401",
            0,
            None,
            None,
            0,
        ),
    ]
    assert "secret" not in repr(p.snapshot())


@pytest.mark.parametrize(
    ("choice", "affinity", "last_failure", "expected"),
    [
        (
            AllCoolingDown(150.0, 50),
            AffinityKind.NONE,
            None,
            FailHttp(429, "all_accounts_cooling_down", 50.0),
        ),
        (
            AllCoolingDown(150.0, 7),
            AffinityKind.HARD,
            None,
            FailHttp(429, "all_accounts_cooling_down", 7.0),
        ),
        # The hard owner alone is cooling: the error says so, not "every account".
        (
            AllCoolingDown(150.0, 7, owner="a"),
            AffinityKind.HARD,
            None,
            FailHttp(429, "owner_cooling_down", 7.0),
        ),
        (NoneUsable("disabled"), AffinityKind.NONE, None, FailHttp(503, "no_account")),
        (
            NoneUsable("disabled"),
            AffinityKind.SOFT,
            UpstreamClosed(1011),
            FailHttp(503, "no_account"),
        ),
        # Every other account was tried for this request: the last failure speaks.
        (
            NoneUsable("excluded"),
            AffinityKind.SOFT,
            UpstreamClosed(1011),
            FailHttp(502, "upstream_error"),
        ),
        (
            NoneUsable("excluded"),
            AffinityKind.NONE,
            HandshakeRejected(429, retry_after_s=9.0),
            FailHttp(429, "rate_limit_exceeded", 9.0, upstream_status=429),
        ),
        (NoneUsable("excluded"), AffinityKind.NONE, None, FailHttp(503, "no_account")),
        # A hard owner that is gone or disabled.
        (
            NoneUsable("removed", owner="a"),
            AffinityKind.HARD,
            None,
            FailHttp(502, "owner_unavailable"),
        ),
        (
            NoneUsable("disabled", owner="a"),
            AffinityKind.HARD,
            HandshakeRejected(401),
            FailHttp(502, "owner_unavailable", upstream_status=401),
        ),
    ],
)
def test_fail_http_for_choice(
    choice: AllCoolingDown | NoneUsable,
    affinity: AffinityKind,
    last_failure: UpstreamClosed | HandshakeRejected | None,
    expected: FailHttp,
) -> None:
    assert fail_http_for_choice(choice, affinity=affinity, last_failure=last_failure) == expected


# -- rate-limit figures ---------------------------------------------------------------------


def figures(used: float, reset_in: float = 3600.0) -> RateLimits:
    return RateLimits(Window(used, 300, WALL + reset_in))


def chosen_as(pool: AccountPool, account_id: str) -> Chosen:
    account = pool.account(account_id)
    assert account is not None
    return Chosen(account)


def pool_with_wall(*ids: str) -> tuple[AccountPool, list[float]]:
    now = [0.0]
    config = AccountsConfig(tuple(Account(i, f"tok-{i}") for i in ids))
    return AccountPool(config, clock=lambda: now[0], wall_clock=lambda: WALL + now[0]), now


def test_the_most_headroom_is_preferred_then_fewest_in_flight() -> None:
    pool, _ = pool_with_wall("team-a", "team-b", "team-c")
    pool.record_rate_limits("team-a", figures(80))
    pool.record_rate_limits("team-b", figures(10))
    assert pool.choose() == chosen_as(pool, "team-c")  # unknown: full headroom
    pool.record_rate_limits("team-c", figures(50))
    assert pool.choose() == chosen_as(pool, "team-b")
    pool.record_rate_limits("team-c", figures(10))
    pool.acquire("team-b")
    assert pool.choose() == chosen_as(pool, "team-c")


def test_an_exhausted_window_keeps_the_account_out_until_its_reset() -> None:
    pool, now = pool_with_wall("team-a", "team-b")
    pool.record_rate_limits("team-a", figures(100, reset_in=600))
    assert pool.choose() == chosen_as(pool, "team-b")
    assert pool.choose(prefer="team-a") == chosen_as(pool, "team-b")
    assert pool.choose(exclude={"team-b"}) == AllCoolingDown(600.0, 600, usage_limited=True)
    assert pool.snapshot()[0].health == "exhausted: rate limit window at 100%"
    # A hard owner is still its owner: the upstream's own answer decides.
    assert pool.choose_owner("team-a") == chosen_as(pool, "team-a")
    now[0] = 600.0
    assert pool.choose(exclude={"team-b"}) == chosen_as(pool, "team-a")


def test_rows_show_the_figures() -> None:
    pool, _ = pool_with_wall("team-a")
    pool.record_rate_limits("team-a", figures(42))
    assert pool.snapshot()[0].rate_limits == "primary 42% of 300m"


@pytest.mark.parametrize(
    "failure",
    [
        ConnectionLost(),
        UpstreamClosed(1000),
        UpstreamClosed(1011, "keepalive ping timeout", by_bridge=True),
        UpstreamErrorEvent("websocket_connection_limit_reached", 400),
    ],
)
def test_account_neutral_failures_never_strike(
    failure: ConnectionLost | UpstreamClosed | UpstreamErrorEvent,
) -> None:
    pool, _ = pool_with_wall("team-a")
    for _ in range(5):
        assert pool.record_failure("team-a", failure) == Healthy()


def test_disable() -> None:
    pool, _ = pool_with_wall("team-a")
    pool.disable("team-a", "token refresh refused: invalid_grant")
    assert pool.health("team-a") == Disabled("token refresh refused: invalid_grant")


@pytest.mark.parametrize(
    ("load", "expected"),
    [
        ({"a": 3, "b": 1, "c": 2}, "b"),
        ({"a": 0, "b": 0}, "a"),  # ties: file order
        ({"a": 5}, "b"),  # an account missing from the load counts 0
    ],
)
def test_shared_load_replaces_local_counts(load: dict[str, int], expected: str) -> None:
    p, _ = pool("a", "b", "c")
    p.acquire("b")
    p.acquire("b")  # local counts are ignored when a load is given
    assert chosen(p.choose(load=load)) == expected


def test_adopted_health_is_the_pool_health() -> None:
    p, clock = pool("a", "b")
    p.adopt("a", Cooling(clock() + 30, "HTTP 429 elsewhere"))
    assert chosen(p.choose()) == "b"
    clock.now += 31
    assert p.is_usable("a")
    p.adopt("b", Disabled("HTTP 401"))
    assert isinstance(p.choose_owner("b"), NoneUsable)


def test_owner_cooling_message_names_the_owner() -> None:
    fail = fail_http_for_choice(
        AllCoolingDown(150.0, 7, owner="team-a"), affinity=AffinityKind.HARD
    )
    assert "team-a" in fail.message and "every" not in fail.message


# (what took each account out, usage_limited): a pool is "out on usage" only when every
# candidate is, so that Codex CLI shows its usage message and does not retry.
USAGE_TABLE = [
    (["exhausted", "exhausted"], True),
    (["exhausted", "usage-limit"], True),
    (["usage-limit", "usage-limit-429"], True),
    (["exhausted", "throttled"], False),  # a short 429 throttle is no usage limit
    (["exhausted", "fault"], False),
    (["fault", "fault"], False),
]
USAGE_429 = b'{"error": {"type": "usage_limit_reached", "resets_in_seconds": 300}}'


@pytest.mark.parametrize(("causes", "usage_limited"), USAGE_TABLE)
def test_a_pool_out_on_usage_limits(causes: list[str], usage_limited: bool) -> None:
    ids = [f"team-{i}" for i in range(len(causes))]
    pool, _ = pool_with_wall(*ids)
    pool.rules = HealthRules(fault_min_samples=1)
    for account_id, cause in zip(ids, causes, strict=True):
        if cause == "exhausted":
            pool.record_rate_limits(account_id, figures(100, reset_in=600))
        elif cause == "usage-limit":
            usage = error_event(429, "usage_limit_reached", "The usage limit has been reached")
            pool.record_failure(account_id, error_failure(usage))
        elif cause == "usage-limit-429":
            pool.record_failure(account_id, handshake_rejected(429, [], USAGE_429, wall_now=WALL))
        elif cause == "throttled":
            pool.record_failure(account_id, HandshakeRejected(429, retry_after_s=300.0))
        else:
            pool.record_failure(account_id, UpstreamClosed(1011))
    choice = pool.choose()
    assert isinstance(choice, AllCoolingDown)
    assert choice.usage_limited is usage_limited
    fail = fail_http_for_choice(choice, affinity=AffinityKind.NONE)
    expected = "usage_limit_reached" if usage_limited else "all_accounts_cooling_down"
    assert (fail.status, fail.code) == (429, expected)
    # The earliest reset is the Retry-After.
    assert fail.retry_after_s == float(choice.retry_after_s)


def test_a_hard_owner_out_on_its_usage_limit_says_so() -> None:
    p, _ = pool("a", "b")
    usage = error_event(429, "usage_limit_reached", "The usage limit has been reached")
    usage["headers"] = {"retry-after": "30"}
    p.record_failure("a", error_failure(usage))
    choice = p.choose_owner("a")
    assert choice == AllCoolingDown(130.0, 30, owner="a", usage_limited=True)
    fail = fail_http_for_choice(choice, affinity=AffinityKind.HARD)
    assert fail.code == "usage_limit_reached" and "(a)" in fail.message
