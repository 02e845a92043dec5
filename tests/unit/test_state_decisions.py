"""Pure decisions of the state package: the option, the store's health, the fallbacks."""

from __future__ import annotations

import pytest
from responses_ws_bridge.core.account_pool import HEALTHY, Cooling, Disabled, HealthRules
from responses_ws_bridge.core.affinity import AffinityKind, classify
from responses_ws_bridge.core.bindings import Binding
from responses_ws_bridge.core.failures import (
    ConnectFailed,
    ConnectionLost,
    Failure,
    HandshakeRejected,
    UpstreamClosed,
    UpstreamErrorEvent,
)
from responses_ws_bridge.state import store_health
from responses_ws_bridge.state.config import StateConfig, parse_state_config
from responses_ws_bridge.state.fallback import (
    FailClosed,
    Owned,
    Unbound,
    bind_decision,
    owner_decision,
    stored_owner,
)
from responses_ws_bridge.state.fingerprint import fingerprint
from responses_ws_bridge.state.guarded import StateUnavailable
from responses_ws_bridge.state.health_record import (
    CoolDown,
    Disable,
    change_for,
    cleared,
    cooled,
    health_of,
    on_pool_clock,
)
from responses_ws_bridge.state.store import AccountHealthRecord, Lookup
from responses_ws_bridge.state.store_health import (
    CONNECTED,
    Backoff,
    Failing,
    Log,
    may_try,
    on_failure,
    on_success,
)

HARD, SOFT, NONE = AffinityKind.HARD, AffinityKind.SOFT, AffinityKind.NONE
DOWN = StateUnavailable("lookup", "ConnectionError")


@pytest.mark.parametrize(
    ("url", "namespace", "expected"),
    [
        ("", "", StateConfig(None, "bridge")),
        ("  ", "team", StateConfig(None, "team")),
        ("redis://h:6379", "", StateConfig("redis://h:6379", "bridge")),
        ("redis://h:6379/2", "", StateConfig("redis://h:6379/2", "bridge")),
        ("redis://h:6379/team-a", "", StateConfig("redis://h:6379", "team-a")),
        ("rediss://u:pw@h/3/team-a", "", StateConfig("rediss://u:pw@h/3", "team-a")),
        ("redis://h/team-a", "override", StateConfig("redis://h", "override")),
        ("unix:///run/v.sock?db=1", "", StateConfig("unix:///run/v.sock?db=1", "bridge")),
    ],
)
def test_state_option(url: str, namespace: str, expected: StateConfig) -> None:
    assert parse_state_config(url, namespace) == expected


@pytest.mark.parametrize(
    ("url", "namespace", "message"),
    [
        ("http://h", "", "is not redis://"),
        ("redis://", "", "has no host"),
        ("unix://", "", "socket path"),
        ("redis://h/a/b", "", "must be /DB"),
        ("redis://h/team/2", "", "must be /DB"),
        ("redis://h", "bad name!", "namespace"),
    ],
)
def test_bad_state_option(url: str, namespace: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_state_config(url, namespace)


def test_display_url_hides_the_password() -> None:
    config = parse_state_config("rediss://user:hunter2@h:6380/1/team")
    assert config.display_url() == "rediss://user:***@h:6380/1"
    assert "hunter2" not in parse_state_config("redis://:hunter2@h").display_url()
    assert StateConfig(None, "x").display_url() == "memory"


def test_fingerprints_depend_on_salt_and_key() -> None:
    a = fingerprint("salt-1", "session:s")
    assert a == fingerprint("salt-1", "session:s")
    assert a != fingerprint("salt-2", "session:s")
    assert a != fingerprint("salt-1", "session:t")
    assert "session" not in a and len(a) == 64


BACKOFF = Backoff(base_s=0.5, factor=2.0, max_s=4.0, jitter_fraction=0.2)


@pytest.mark.parametrize(
    ("failures", "jitter", "delay"),
    [(1, 0.0, 0.5), (2, 0.0, 1.0), (3, 0.0, 2.0), (4, 0.0, 4.0), (9, 0.0, 4.0), (1, 0.5, 0.55)],
)
def test_backoff(failures: int, jitter: float, delay: float) -> None:
    assert BACKOFF.delay(failures, jitter) == pytest.approx(delay)


def test_store_health_table() -> None:
    # (state, event at t) -> (state, log), walked as one outage.
    state, log = on_success(CONNECTED)
    assert (state, log) == (CONNECTED, Log.NOTHING)
    state, log = on_failure(CONNECTED, now=10.0, reason="refused", backoff=BACKOFF, jitter=0.0)
    assert (state, log) == (Failing(10.0, 1, 10.5, "refused"), Log.UNAVAILABLE)
    assert not may_try(state, 10.4)
    assert may_try(state, 10.5)
    state, log = on_failure(state, now=10.5, reason="refused", backoff=BACKOFF, jitter=0.0)
    assert (state, log) == (Failing(10.0, 2, 11.5, "refused"), Log.NOTHING)
    state, log = on_failure(state, now=11.5, reason="timeout", backoff=BACKOFF, jitter=0.0)
    assert (state, log) == (Failing(10.0, 3, 13.5, "timeout"), Log.NOTHING)
    state, log = on_success(state)
    assert (state, log) == (CONNECTED, Log.BACK)
    assert may_try(state, 0.0)
    assert isinstance(store_health.on_success(state)[0], store_health.Connected)


@pytest.mark.parametrize(
    ("kind", "stored", "local", "decision"),
    [
        (NONE, DOWN, None, Unbound()),
        (HARD, "a", "b", Owned("a")),
        (SOFT, "a", None, Owned("a")),
        (HARD, None, "b", Unbound(prefer="b")),
        (HARD, None, None, Unbound()),
        (HARD, DOWN, "b", Owned("b", from_store=False)),
        (HARD, DOWN, None, FailClosed("ConnectionError")),
        (SOFT, DOWN, "b", Unbound(prefer="b")),
        (SOFT, DOWN, None, Unbound()),
    ],
)
def test_owner_decision(
    kind: AffinityKind, stored: str | StateUnavailable | None, local: str | None, decision: object
) -> None:
    assert owner_decision(kind, stored, local) == decision


@pytest.mark.parametrize(
    ("kind", "stored", "decision"),
    [
        (HARD, "c", Owned("c")),
        (HARD, "other", Owned("other")),
        (HARD, DOWN, FailClosed("ConnectionError")),
        (SOFT, "other", Owned("other")),
        (SOFT, DOWN, Owned("c", from_store=False)),
    ],
)
def test_bind_decision(
    kind: AffinityKind, stored: str | StateUnavailable, decision: object
) -> None:
    assert bind_decision(kind, stored, "c") == decision


def test_health_records_read_as_pool_health() -> None:
    record = cooled(AccountHealthRecord(), 100.0, "HTTP 429")
    assert health_of(record, 99.0) == Cooling(100.0, "HTTP 429")
    assert health_of(record, 100.0) == HEALTHY
    assert cooled(record, 50.0, "shorter") == record
    assert health_of(cleared(record), 99.0) == HEALTHY
    disabled = AccountHealthRecord(disabled="HTTP 401", cooldown_until=100.0)
    assert health_of(cleared(disabled), 0.0) == Disabled("HTTP 401")


REJECTED = "upstream rejected the WebSocket handshake with HTTP"
RULES = HealthRules(rate_limit_default_s=60.0)


@pytest.mark.parametrize(
    ("failure", "change"),
    [
        (HandshakeRejected(401), Disable(f"{REJECTED} 401")),
        (HandshakeRejected(403), Disable(f"{REJECTED} 403")),
        (HandshakeRejected(429, retry_after_s=5.0), CoolDown(105.0, f"{REJECTED} 429")),
        (
            UpstreamErrorEvent("rate_limit_exceeded"),
            CoolDown(160.0, "upstream error event rate_limit_exceeded"),
        ),
        # Faults: the pool's fault rate decides; only its cooldown is shared.
        (HandshakeRejected(503), None),
        (UpstreamClosed(1011), None),
        (UpstreamClosed(1011, by_bridge=True), None),
        (UpstreamClosed(1006), None),
        (ConnectionLost(), None),
        (ConnectFailed("refused"), None),
        (UpstreamErrorEvent("invalid_request_error"), None),
    ],
)
def test_health_change_mirrors_the_pool_rule(failure: Failure, change: object) -> None:
    assert change_for(failure, RULES, 100.0) == change


def test_health_moves_to_the_pool_clock() -> None:
    # Read at wall time 1000 with the pool's clock at 5: 30 s left either way.
    assert on_pool_clock(Cooling(1030.0, "r"), 1000.0, 5.0) == Cooling(35.0, "r")
    assert on_pool_clock(HEALTHY, 1000.0, 5.0) == HEALTHY
    assert on_pool_clock(Disabled("x"), 1000.0, 5.0) == Disabled("x")


@pytest.mark.parametrize(
    ("headers", "body", "found", "owner"),
    [
        ([], {}, Lookup("a", {}), None),  # no affinity: no owner
        ([("session-id", "s")], {}, Lookup(None, {"session:s": Binding("b")}), "b"),
        # The response's owner is authoritative over a header binding.
        (
            [("session-id", "s")],
            {"previous_response_id": "r"},
            Lookup("a", {"session:s": Binding("b")}),
            "a",
        ),
        ([("session-id", "s")], {"previous_response_id": "r"}, Lookup(None, {}), None),
        ([], {"prompt_cache_key": "k"}, Lookup(None, {"prompt-cache:k": Binding("c", SOFT)}), "c"),
    ],
)
def test_stored_owner(
    headers: list[tuple[str, str]], body: dict[str, str], found: Lookup, owner: str | None
) -> None:
    assert stored_owner(classify(headers, body), found) == owner
