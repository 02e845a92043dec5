"""The reconnect decision table, cell by cell, and the helpers around it."""

from __future__ import annotations

import email.utils
import json
from collections.abc import Mapping
from typing import Any

import pytest
from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.failures import (
    ConnectFailed,
    ConnectionLost,
    Failure,
    HandshakeRejected,
    InvalidUpstreamEvent,
    UpstreamClosed,
    UpstreamErrorEvent,
    UpstreamSilent,
    refresh_failure,
)
from responses_ws_bridge.core.retry_policy import (
    Decision,
    FailHttp,
    FailStreamIncomplete,
    Relay,
    RetryOther,
    RetrySame,
    backoff_delay,
    decide,
    free_retry,
    handshake_rejected,
    is_transient,
    retry_after_from,
)
from responses_ws_bridge.core.upstream_events import parse_error_event
from responses_ws_bridge.local.response_events import error_event, rate_limit_event

HARD, SOFT, NONE = AffinityKind.HARD, AffinityKind.SOFT, AffinityKind.NONE
ACCOUNT = "team-a"
BUDGET = 2

C1000, C1001, C1006 = UpstreamClosed(1000), UpstreamClosed(1001), UpstreamClosed(1006)
C1011, C1012, C1013 = UpstreamClosed(1011), UpstreamClosed(1012), UpstreamClosed(1013)
LOST = ConnectionLost()
H401, H403, H503 = HandshakeRejected(401), HandshakeRejected(403), HandshakeRejected(503)
H429 = HandshakeRejected(429, retry_after_s=30.0)
RATE = UpstreamErrorEvent("rate_limit_exceeded", 429, retry_after_s=5.0)
SILENT = UpstreamSilent(300.0)
GARBAGE = InvalidUpstreamEvent("a binary frame")
INVALID = FailHttp(502, "invalid_upstream_event")
# No token: the refresh failed for now, was refused for good, or had no store lock to run under.
REFRESH = refresh_failure("token_refresh_timeout", permanent=False, retry_after_s=7.0)
REFUSED = refresh_failure("invalid_grant", permanent=True, retry_after_s=None)
NO_LOCK = refresh_failure("state_store_unavailable", permanent=False, retry_after_s=1.0)
REFRESH_503 = FailHttp(503, "token_refresh_failed", 7.0)
REFUSED_502 = FailHttp(502, "token_refresh_failed")
NO_LOCK_503 = FailHttp(503, "state_store_unavailable", 1.0)

# First retry with jitter 0, base 0.25 s: half of one step.
SAME = RetrySame(ACCOUNT, 0.125)
OTHER = RetryOther(ACCOUNT)
OWNER_GONE = FailHttp(502, "owner_unavailable")
UPSTREAM = FailHttp(502, "upstream_error")
PASS_429_HS = FailHttp(429, "rate_limit_exceeded", 30.0, upstream_status=429)
PASS_429_EV = FailHttp(429, "rate_limit_exceeded", 5.0)
RELAY = Relay()
OVERLOADED = UpstreamErrorEvent("server_is_overloaded", None, "server_error")
AUTH = UpstreamErrorEvent("invalid_api_key", 401, "invalid_request_error")
AUTH_GONE = UpstreamErrorEvent("token_expired", 401)
BOUND = UpstreamErrorEvent("invalid_encrypted_content", 400, "invalid_request_error")
H431 = HandshakeRejected(431)
FIRST = UpstreamSilent(240.0, first_event=True)
BUSY = FailHttp(503, "server_is_overloaded")
PASS_431 = FailHttp(431, "upstream_rejected", upstream_status=431)
TIMEOUT = FailHttp(504, "upstream_timeout")
NEW_ROWS = {OVERLOADED, AUTH, AUTH_GONE, BOUND, H431, FIRST}


def owner_gone(status: int) -> FailHttp:
    return FailHttp(502, "owner_unavailable", upstream_status=status)


def upstream(status: int) -> FailHttp:
    return FailHttp(502, "upstream_error", upstream_status=status)


def incomplete(code: int | None) -> FailStreamIncomplete:
    return FailStreamIncomplete(code)


# (affinity, failure, before any event & budget left, before & budget spent,
#  after an event & budget left, after & budget spent)
TABLE: list[tuple[AffinityKind, Failure, Decision, Decision, Decision, Decision]] = [
    # HARD: every retry goes to the owner, 1011 like any other close; never another account.
    (HARD, C1000, SAME, OWNER_GONE, incomplete(1000), incomplete(1000)),
    (HARD, C1001, SAME, OWNER_GONE, incomplete(1001), incomplete(1001)),
    (HARD, C1006, SAME, OWNER_GONE, incomplete(1006), incomplete(1006)),
    (HARD, C1011, SAME, OWNER_GONE, incomplete(1011), incomplete(1011)),
    (HARD, C1012, SAME, OWNER_GONE, incomplete(1012), incomplete(1012)),
    (HARD, C1013, SAME, OWNER_GONE, incomplete(1013), incomplete(1013)),
    (HARD, LOST, SAME, OWNER_GONE, incomplete(1006), incomplete(1006)),
    (HARD, H401, owner_gone(401), owner_gone(401), incomplete(None), incomplete(None)),
    (HARD, H403, owner_gone(403), owner_gone(403), incomplete(None), incomplete(None)),
    (HARD, H429, PASS_429_HS, PASS_429_HS, incomplete(None), incomplete(None)),
    (HARD, H503, SAME, owner_gone(503), incomplete(None), incomplete(None)),
    (HARD, SILENT, SAME, OWNER_GONE, incomplete(None), incomplete(None)),
    (HARD, GARBAGE, INVALID, INVALID, incomplete(None), incomplete(None)),
    (HARD, RATE, PASS_429_EV, PASS_429_EV, RELAY, RELAY),
    (HARD, OVERLOADED, SAME, BUSY, RELAY, RELAY),
    (HARD, AUTH, OWNER_GONE, OWNER_GONE, RELAY, RELAY),
    (HARD, AUTH_GONE, OWNER_GONE, OWNER_GONE, RELAY, RELAY),
    (HARD, BOUND, RELAY, RELAY, RELAY, RELAY),
    (HARD, H431, PASS_431, PASS_431, incomplete(None), incomplete(None)),
    (HARD, FIRST, TIMEOUT, TIMEOUT, incomplete(None), incomplete(None)),
    # A refresh failure is told as what it is, at once: never a retry on the owner.
    (HARD, REFRESH, REFRESH_503, REFRESH_503, incomplete(None), incomplete(None)),
    (HARD, REFUSED, REFUSED_502, REFUSED_502, incomplete(None), incomplete(None)),
    (HARD, NO_LOCK, NO_LOCK_503, NO_LOCK_503, incomplete(None), incomplete(None)),
    # SOFT: 1011, handshake errors and rate limits move; other closes stay.
    (SOFT, C1000, SAME, UPSTREAM, incomplete(1000), incomplete(1000)),
    (SOFT, C1001, SAME, UPSTREAM, incomplete(1001), incomplete(1001)),
    (SOFT, C1006, SAME, UPSTREAM, incomplete(1006), incomplete(1006)),
    (SOFT, C1011, OTHER, UPSTREAM, incomplete(1011), incomplete(1011)),
    (SOFT, C1012, SAME, UPSTREAM, incomplete(1012), incomplete(1012)),
    (SOFT, C1013, SAME, UPSTREAM, incomplete(1013), incomplete(1013)),
    (SOFT, LOST, SAME, UPSTREAM, incomplete(1006), incomplete(1006)),
    (SOFT, H401, OTHER, upstream(401), incomplete(None), incomplete(None)),
    (SOFT, H403, OTHER, upstream(403), incomplete(None), incomplete(None)),
    (SOFT, H429, OTHER, PASS_429_HS, incomplete(None), incomplete(None)),
    (SOFT, H503, OTHER, upstream(503), incomplete(None), incomplete(None)),
    (SOFT, SILENT, SAME, UPSTREAM, incomplete(None), incomplete(None)),
    (SOFT, GARBAGE, INVALID, INVALID, incomplete(None), incomplete(None)),
    (SOFT, RATE, OTHER, PASS_429_EV, RELAY, RELAY),
    (SOFT, OVERLOADED, OTHER, BUSY, RELAY, RELAY),
    (SOFT, AUTH, OTHER, UPSTREAM, RELAY, RELAY),
    (SOFT, AUTH_GONE, OTHER, UPSTREAM, RELAY, RELAY),
    (SOFT, BOUND, RELAY, RELAY, RELAY, RELAY),
    (SOFT, H431, PASS_431, PASS_431, incomplete(None), incomplete(None)),
    (SOFT, FIRST, TIMEOUT, TIMEOUT, incomplete(None), incomplete(None)),
    (SOFT, REFRESH, OTHER, REFRESH_503, incomplete(None), incomplete(None)),
    (SOFT, REFUSED, OTHER, REFUSED_502, incomplete(None), incomplete(None)),
    (SOFT, NO_LOCK, OTHER, NO_LOCK_503, incomplete(None), incomplete(None)),
    # NONE: the same rules as SOFT.
    (NONE, C1000, SAME, UPSTREAM, incomplete(1000), incomplete(1000)),
    (NONE, C1001, SAME, UPSTREAM, incomplete(1001), incomplete(1001)),
    (NONE, C1006, SAME, UPSTREAM, incomplete(1006), incomplete(1006)),
    (NONE, C1011, OTHER, UPSTREAM, incomplete(1011), incomplete(1011)),
    (NONE, C1012, SAME, UPSTREAM, incomplete(1012), incomplete(1012)),
    (NONE, C1013, SAME, UPSTREAM, incomplete(1013), incomplete(1013)),
    (NONE, LOST, SAME, UPSTREAM, incomplete(1006), incomplete(1006)),
    (NONE, H401, OTHER, upstream(401), incomplete(None), incomplete(None)),
    (NONE, H403, OTHER, upstream(403), incomplete(None), incomplete(None)),
    (NONE, H429, OTHER, PASS_429_HS, incomplete(None), incomplete(None)),
    (NONE, H503, OTHER, upstream(503), incomplete(None), incomplete(None)),
    (NONE, SILENT, SAME, UPSTREAM, incomplete(None), incomplete(None)),
    (NONE, GARBAGE, INVALID, INVALID, incomplete(None), incomplete(None)),
    (NONE, RATE, OTHER, PASS_429_EV, RELAY, RELAY),
    (NONE, OVERLOADED, OTHER, BUSY, RELAY, RELAY),
    (NONE, AUTH, OTHER, UPSTREAM, RELAY, RELAY),
    (NONE, AUTH_GONE, OTHER, UPSTREAM, RELAY, RELAY),
    (NONE, BOUND, RELAY, RELAY, RELAY, RELAY),
    (NONE, H431, PASS_431, PASS_431, incomplete(None), incomplete(None)),
    (NONE, FIRST, TIMEOUT, TIMEOUT, incomplete(None), incomplete(None)),
    (NONE, REFRESH, OTHER, REFRESH_503, incomplete(None), incomplete(None)),
    (NONE, REFUSED, OTHER, REFUSED_502, incomplete(None), incomplete(None)),
    (NONE, NO_LOCK, OTHER, NO_LOCK_503, incomplete(None), incomplete(None)),
]

COLUMNS = [(False, False), (False, True), (True, False), (True, True)]  # (seen, spent)


@pytest.mark.parametrize(
    ("affinity", "failure", "expected"),
    [pytest.param(a, f, e, id=f"{a}-{f}") for a, f, *e in TABLE],
)
def test_decision_table(affinity: AffinityKind, failure: Failure, expected: list[Decision]) -> None:
    """One row: before any event with budget left and spent, after an event likewise."""
    got = [
        decide(
            affinity=affinity,
            failure=failure,
            client_has_seen_event=seen,
            attempts_made=BUDGET + 1 if spent else 1,
            retry_budget=BUDGET,
            account_id=ACCOUNT,
            owner_usable=True,
        )
        for seen, spent in COLUMNS
    ]
    assert got == expected


def test_table_covers_every_cell() -> None:
    failures = {C1000, C1001, C1006, C1011, C1012, C1013, LOST, H401, H403, H429, H503, RATE}
    failures |= {SILENT, GARBAGE, REFRESH, REFUSED, NO_LOCK} | NEW_ROWS
    assert {(a, f) for a, f, *_ in TABLE} == {(a, f) for a in AffinityKind for f in failures}
    assert len(TABLE) == 3 * len(failures)


def test_seed_bug_hard_affinity_1011_before_response_created_retries_the_owner() -> None:
    # The bug this bridge exists to avoid: a 1011 before response.created
    # excluded the hard owner and replayed the session on another account.
    # Every retry must go to the owner.
    for attempts_made in range(1, BUDGET + 1):
        decision = decide(
            affinity=HARD,
            failure=UpstreamClosed(1011, "internal error"),
            client_has_seen_event=False,
            attempts_made=attempts_made,
            retry_budget=BUDGET,
            account_id="owner",
            owner_usable=True,
        )
        assert isinstance(decision, RetrySame)
        assert decision.account == "owner"
    spent = decide(
        affinity=HARD,
        failure=UpstreamClosed(1011),
        client_has_seen_event=False,
        attempts_made=BUDGET + 1,
        retry_budget=BUDGET,
        account_id="owner",
        owner_usable=True,
    )
    assert spent == FailHttp(502, "owner_unavailable")


ALL_FAILURES: list[Failure] = [
    C1000,
    C1001,
    C1006,
    C1011,
    C1012,
    C1013,
    UpstreamClosed(1005),
    UpstreamClosed(1005),
    UpstreamClosed(1015),
    LOST,
    ConnectFailed("refused"),
    ConnectFailed("timeout", timed_out=True),
    H401,
    H403,
    HandshakeRejected(404),
    HandshakeRejected(426),
    H429,
    HandshakeRejected(500),
    H503,
    RATE,
    UpstreamErrorEvent("usage_limit_reached"),
    UpstreamErrorEvent("insufficient_quota"),
    UpstreamErrorEvent("invalid_request_error", 400),
]


@pytest.mark.parametrize("failure", ALL_FAILURES, ids=repr)
def test_hard_never_moves_to_another_account(failure: Failure) -> None:
    for owner_usable in (True, False):
        for attempts_made in range(1, BUDGET + 3):
            decision = decide(
                affinity=HARD,
                failure=failure,
                client_has_seen_event=False,
                attempts_made=attempts_made,
                retry_budget=BUDGET,
                account_id="owner",
                owner_usable=owner_usable,
            )
            assert not isinstance(decision, RetryOther)
            if isinstance(decision, RetrySame):
                assert decision.account == "owner"


@pytest.mark.parametrize(
    ("affinity", "failure", "expected"),
    [
        # The pool made the owner unusable (e.g. repeated 1011 cooldown): fail, never move.
        (HARD, C1011, OWNER_GONE),
        (HARD, LOST, OWNER_GONE),
        (HARD, H503, owner_gone(503)),
        # SOFT/NONE leave an account the pool no longer finds usable, whatever the close.
        (SOFT, C1000, OTHER),
        (SOFT, C1006, OTHER),
        (NONE, LOST, OTHER),
        (NONE, C1013, OTHER),
    ],
)
def test_owner_not_usable(affinity: AffinityKind, failure: Failure, expected: Decision) -> None:
    decision = decide(
        affinity=affinity,
        failure=failure,
        client_has_seen_event=False,
        attempts_made=1,
        retry_budget=BUDGET,
        account_id=ACCOUNT,
        owner_usable=False,
    )
    assert decision == expected


@pytest.mark.parametrize(
    ("affinity", "failure", "expected"),
    [
        # Not a WebSocket endpoint: never the same account again.
        (HARD, HandshakeRejected(404), owner_gone(404)),
        (HARD, HandshakeRejected(426), owner_gone(426)),
        (SOFT, HandshakeRejected(404), OTHER),
        (NONE, HandshakeRejected(426), OTHER),
        # Connect failures say nothing against the account.
        (HARD, ConnectFailed("refused"), SAME),
        (SOFT, ConnectFailed("timeout", timed_out=True), SAME),
        (NONE, ConnectFailed("refused"), SAME),
        # Other close codes a client may see behave like 1000/1001/1006.
        (SOFT, UpstreamClosed(1005), SAME),
        (NONE, UpstreamClosed(1015), SAME),
        (HARD, UpstreamClosed(1005), SAME),
        # Quota codes count as rate limits, and their code is passed on.
        (
            HARD,
            UpstreamErrorEvent("usage_limit_reached", 429),
            FailHttp(429, "usage_limit_reached"),
        ),
        (HARD, UpstreamErrorEvent("insufficient_quota", 429), FailHttp(429, "insufficient_quota")),
        (SOFT, UpstreamErrorEvent("usage_limit_reached", 429), OTHER),
        (NONE, UpstreamErrorEvent("insufficient_quota"), OTHER),
    ],
)
def test_other_failures_before_any_event(
    affinity: AffinityKind, failure: Failure, expected: Decision
) -> None:
    decision = decide(
        affinity=affinity,
        failure=failure,
        client_has_seen_event=False,
        attempts_made=1,
        retry_budget=BUDGET,
        account_id=ACCOUNT,
        owner_usable=True,
    )
    assert decision == expected


@pytest.mark.parametrize("affinity", list(AffinityKind))
@pytest.mark.parametrize("seen", [False, True])
@pytest.mark.parametrize(
    "failure",
    [
        UpstreamErrorEvent("invalid_request_error", 400),
        UpstreamErrorEvent("previous_response_not_found", 400),
        UpstreamErrorEvent(None, 500),
    ],
    ids=repr,
)
def test_other_error_events_go_to_the_client_as_they_are(
    affinity: AffinityKind, seen: bool, failure: Failure
) -> None:
    decision = decide(
        affinity=affinity,
        failure=failure,
        client_has_seen_event=seen,
        attempts_made=1,
        retry_budget=BUDGET,
        account_id=ACCOUNT,
        owner_usable=True,
    )
    assert decision == RELAY


@pytest.mark.parametrize("affinity", list(AffinityKind))
def test_zero_budget_never_retries(affinity: AffinityKind) -> None:
    decision = decide(
        affinity=affinity,
        failure=C1006,
        client_has_seen_event=False,
        attempts_made=1,
        retry_budget=0,
        account_id=ACCOUNT,
        owner_usable=True,
    )
    assert isinstance(decision, FailHttp)
    assert decision.status == 502


def test_retry_delays_grow_and_take_the_injected_jitter() -> None:
    delays = [
        decide(
            affinity=HARD,
            failure=C1011,
            client_has_seen_event=False,
            attempts_made=attempts_made,
            retry_budget=5,
            account_id=ACCOUNT,
            owner_usable=True,
            backoff_base_s=1.0,
            backoff_cap_s=4.0,
            jitter=0.5,
        )
        for attempts_made in (1, 2, 3, 4)
    ]
    assert delays == [
        RetrySame(ACCOUNT, 0.75),
        RetrySame(ACCOUNT, 1.5),
        RetrySame(ACCOUNT, 3.0),
        RetrySame(ACCOUNT, 3.0),
    ]


def test_stream_incomplete_message_names_the_close_code() -> None:
    decision = decide(
        affinity=SOFT,
        failure=UpstreamClosed(1011, "boom"),
        client_has_seen_event=True,
        attempts_made=1,
        retry_budget=BUDGET,
        account_id=ACCOUNT,
        owner_usable=True,
    )
    assert isinstance(decision, FailStreamIncomplete)
    assert "1011" in decision.message


def test_attempts_made_must_count_the_failed_attempt() -> None:
    with pytest.raises(ValueError, match="attempts_made"):
        decide(
            affinity=NONE,
            failure=C1000,
            client_has_seen_event=False,
            attempts_made=0,
            retry_budget=BUDGET,
            account_id=ACCOUNT,
            owner_usable=True,
        )


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "jitter", "expected"),
    [
        (0, 0.25, 2.0, 0.0, 0.125),
        (0, 0.25, 2.0, 0.5, 0.1875),
        (1, 0.25, 2.0, 0.0, 0.25),
        (1, 0.25, 2.0, 0.5, 0.375),
        (2, 0.25, 2.0, 0.0, 0.5),
        (5, 0.25, 2.0, 0.0, 1.0),  # capped: 0.25 * 32 > 2
        (5, 0.25, 2.0, 0.75, 1.75),
        (0, 0.0, 2.0, 0.9, 0.0),
    ],
)
def test_backoff_delay(
    attempt: int, base: float, cap: float, jitter: float, expected: float
) -> None:
    assert backoff_delay(attempt, base=base, cap=cap, jitter=jitter) == pytest.approx(expected)


@pytest.mark.parametrize(("attempt", "jitter"), [(-1, 0.0), (0, 1.0), (0, -0.1)])
def test_backoff_delay_rejects_bad_arguments(attempt: int, jitter: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(attempt, base=0.25, cap=2.0, jitter=jitter)


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ([("Retry-After", "7")], None, 7.0),
        ([("retry-after", "2.5")], b"", 2.5),
        ({"retry-after": "3"}, None, 3.0),
        ([("Retry-After", email.utils.formatdate(NOW + 90, usegmt=True))], None, 90.0),
        ([("Retry-After", "0")], None, None),
        ([("Retry-After", "soon")], None, None),
        (None, {"error": {"resets_in_seconds": 120}}, 120.0),
        (None, {"error": {"retry_after": "15"}}, 15.0),
        (None, {"error": {"resets_at": NOW + 300}}, 300.0),
        (None, {"resets_in_seconds": 42}, 42.0),
        (None, {"resets_at": int(NOW) + 10}, 10.0),
        (None, {"retry_after": 8}, 8.0),
        (None, b'{"error": {"resets_in_seconds": 11}}', 11.0),
        (None, '{"error": {"code": "usage_limit_reached", "resets_at": 1800000060}}', 60.0),
        (None, {"error": {"message": "Rate limit reached. Please try again in 1.5s."}}, 1.5),
        (None, {"error": {"message": "Please try again in 250ms."}}, 0.25),
        # Header first, then the error object before the top level.
        ([("Retry-After", "4")], {"error": {"resets_in_seconds": 99}}, 4.0),
        (None, {"error": {"resets_in_seconds": 5}, "resets_in_seconds": 50}, 5.0),
        # Past, absent, malformed: nothing said.
        (None, {"error": {"resets_at": NOW - 5}}, None),
        (None, {"error": {"resets_in_seconds": True}}, None),
        (None, {"error": {"resets_in_seconds": "NaN"}}, None),
        (None, {"error": {"message": "slow down"}}, None),
        (None, b"not json", None),
        (None, None, None),
        ([("content-type", "application/json")], {"error": {}}, None),
    ],
)
def test_retry_after_from(
    headers: Mapping[str, str] | list[tuple[str, str]] | None, body: Any, expected: float | None
) -> None:
    got = retry_after_from(headers, body, wall_now=NOW)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_handshake_rejected_reads_reset_time_only_for_429() -> None:
    headers = [("Retry-After", "7")]
    assert handshake_rejected(429, headers, b"", wall_now=NOW).retry_after_s == 7.0
    body = b'{"error": {"resets_in_seconds": 30}}'
    assert handshake_rejected(429, [], body, wall_now=NOW).retry_after_s == 30.0
    assert handshake_rejected(503, headers, b"", wall_now=NOW).retry_after_s is None


def error_failure(event: Mapping[str, Any]) -> tuple[str | None, int | None, float | None]:
    parsed = parse_error_event(json.dumps(event), wall_now=NOW)
    assert parsed is not None
    return parsed.code, parsed.status, parsed.retry_after_s


def test_error_event_reset_times_from_real_event_shapes() -> None:
    assert error_failure(rate_limit_event(3)) == ("rate_limit_exceeded", 429, 3.0)
    usage = error_event(429, "usage_limit_reached", "The usage limit has been reached")
    usage["error"]["resets_in_seconds"] = 600
    assert error_failure(usage) == ("usage_limit_reached", 429, 600.0)
    invalid = error_event(400, "invalid_value", "bad input")
    assert error_failure(invalid) == ("invalid_value", 400, None)
    # The SSE `error` event carries its code at the top level.
    sse = {"type": "error", "code": "rate_limit_exceeded", "message": "try again in 2s"}
    assert error_failure(sse) == ("rate_limit_exceeded", None, 2.0)


# -- what the Codex backend does ------------------------------------------------------------

KEEPALIVE = UpstreamClosed(1011, "keepalive ping timeout", by_bridge=True)
AGE_LIMIT = UpstreamErrorEvent("websocket_connection_limit_reached", 400)


@pytest.mark.parametrize(
    ("affinity", "failure", "attempts", "expected"),
    [
        # The bridge's own keepalive 1011 is a lost connection: never a move.
        (SOFT, KEEPALIVE, 1, SAME),
        (NONE, KEEPALIVE, 1, SAME),
        (HARD, KEEPALIVE, 1, SAME),
        (SOFT, C1011, 1, OTHER),
        # The socket age limit: a new socket on the same account, at once, whatever the affinity.
        (HARD, AGE_LIMIT, 1, RetrySame(ACCOUNT, 0.0)),
        (SOFT, AGE_LIMIT, 1, RetrySame(ACCOUNT, 0.0)),
        (SOFT, AGE_LIMIT, 3, UPSTREAM),
        (HARD, AGE_LIMIT, 3, OWNER_GONE),
    ],
)
def test_codex_backend_rows(
    affinity: AffinityKind, failure: Failure, attempts: int, expected: Decision
) -> None:
    got = decide(
        affinity=affinity,
        failure=failure,
        client_has_seen_event=False,
        attempts_made=attempts,
        retry_budget=BUDGET,
        account_id=ACCOUNT,
        owner_usable=True,
    )
    assert got == expected


def test_age_limit_after_an_event_is_relayed() -> None:
    got = decide(
        affinity=SOFT,
        failure=AGE_LIMIT,
        client_has_seen_event=True,
        attempts_made=1,
        account_id=ACCOUNT,
        owner_usable=True,
    )
    assert got == RELAY


@pytest.mark.parametrize(
    ("failure", "reused", "seen", "refreshed", "why"),
    [
        (C1011, True, False, False, "dead_reused_socket"),
        (LOST, True, False, False, "dead_reused_socket"),
        (C1011, False, False, False, None),
        (AGE_LIMIT, True, False, False, "connection_limit"),
        (AGE_LIMIT, False, False, False, "connection_limit"),
        (C1000, False, False, False, "handoff"),
        (UpstreamClosed(1000, by_bridge=True), False, False, False, None),
        (C1001, False, False, False, None),
        (H401, False, False, True, "token_refreshed"),
        (H401, False, False, False, None),
        (H403, False, False, True, None),
        (C1000, False, True, False, None),  # the client saw an event: nothing is free
        (AGE_LIMIT, True, True, False, None),
        (AUTH, False, False, True, "token_refreshed"),
        (AUTH, False, False, False, None),
        (AUTH_GONE, False, False, True, None),  # a permanent code is never refreshed
    ],
)
def test_free_retries(
    failure: Failure, reused: bool, seen: bool, refreshed: bool, why: str | None
) -> None:
    got = free_retry(failure, reused=reused, client_has_seen_event=seen, token_refreshed=refreshed)
    assert got == why


@pytest.mark.parametrize(
    ("failure", "seen", "why"),
    [
        (LOST, False, "prewarm_resend"),
        (C1011, False, "prewarm_resend"),
        (SILENT, False, "prewarm_resend"),
        (LOST, True, None),  # the client saw its events: never sent again
        (RATE, False, None),  # an error event follows the table
        (OVERLOADED, False, None),
    ],
)
def test_a_prewarm_that_failed_after_created_is_sent_once_more(
    failure: Failure, seen: bool, why: str | None
) -> None:
    got = free_retry(
        failure,
        reused=False,
        client_has_seen_event=seen,
        token_refreshed=False,
        prewarm_after_created=True,
    )
    assert got == why


@pytest.mark.parametrize(
    ("failure", "transient"),
    [
        (C1011, True),
        (H503, True),
        (ConnectFailed("refused"), True),
        (LOST, True),
        (H401, False),
        (H429, False),
        (RATE, False),
        (OVERLOADED, True),
        (AUTH, False),
        # The refresher's backoff decides when to try again, not the request's start-over.
        (REFRESH, False),
        (NO_LOCK, False),
    ],
)
def test_transient(failure: Failure, transient: bool) -> None:
    assert is_transient(failure) is transient
