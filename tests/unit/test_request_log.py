"""The one log line per request, as a table: what each kind of ending reads like."""

from __future__ import annotations

import pytest
from responses_ws_bridge.core.affinity import Affinity, AffinityKind
from responses_ws_bridge.core.request_log import Answered, request_line, socket_line
from responses_ws_bridge.core.turns import Attempt, TurnReport

HARD = Affinity(AffinityKind.HARD, "session:s-1", "session-id")
NONE = Affinity(AffinityKind.NONE, None, None)


def report(
    affinity: Affinity, outcome: str, *attempts: Attempt, code: str | None = None
) -> TurnReport:
    made = TurnReport(affinity, outcome=outcome, code=code)
    made.attempts.extend(attempts)
    made.account = attempts[-1].account if attempts else None
    return made


def attempt(
    account: str | None, outcome: str, *, reused: bool = False, preconnected: bool = False
) -> Attempt:
    url = "ws://up/v1/responses"
    return Attempt(1, account, url, reused=reused, preconnected=preconnected, outcome=outcome)


STREAMED = Answered(200, streamed=True, first_s=0.012, total_s=0.0523)


@pytest.mark.parametrize(
    ("answered", "turn", "line"),
    [
        (
            STREAMED,
            report(HARD, "response.completed", attempt("team-a", "response.completed")),
            "POST /v1/responses: 200 response.completed · account team-a · hard affinity · "
            "new socket · first event 12 ms, done 52 ms",
        ),
        (
            STREAMED,
            report(
                HARD, "response.completed", attempt("team-a", "response.completed", reused=True)
            ),
            "POST /v1/responses: 200 response.completed · account team-a · hard affinity · "
            "reused socket · first event 12 ms, done 52 ms",
        ),
        (
            Answered(200, first_s=0.009, total_s=0.010),
            report(
                NONE,
                "response.completed",
                attempt("team-b", "closed"),
                attempt("team-b", "response.completed", preconnected=True),
            ),
            "POST /v1/responses: 200 response.completed · account team-b · no affinity · "
            "new socket on a connection made ahead · 2 attempts · answered 9 ms, done 10 ms",
        ),
        (
            Answered(502, "upstream_unreachable", first_s=0.3, total_s=0.3),
            report(
                NONE,
                "error",
                attempt("team-a", "connect_failed"),
                attempt("team-a", "connect_failed"),
                code="upstream_unreachable",
            ),
            "POST /v1/responses: 502 upstream_unreachable · account team-a · no affinity · "
            "2 attempts, the last connect_failed · 300 ms",
        ),
        (
            Answered(503, "no_account_available", first_s=0.001, total_s=0.001),
            report(NONE, "error", code="no_account_available"),
            "POST /v1/responses: 503 no_account_available · no affinity · 1 ms",
        ),
        (
            Answered(200, streamed=True, first_s=0.01, total_s=2.0),
            report(HARD, "client_gone", attempt(None, "client_gone")),
            "POST /v1/responses: the client left before the end (client_gone) · "
            "account (client credential) · hard affinity · new socket · "
            "first event 10 ms, done 2000 ms",
        ),
        (
            Answered(401, "invalid_client_key", total_s=0.0004),
            None,
            "POST /v1/responses: 401 invalid_client_key · 0 ms",
        ),
    ],
)
def test_request_line(answered: Answered, turn: TurnReport | None, line: str) -> None:
    assert request_line("POST", "/v1/responses", answered, turn) == line


def test_the_query_and_the_key_stay_out() -> None:
    turn = report(HARD, "response.completed", attempt("team-a", "response.completed"))
    line = request_line("POST", "/v1/responses?api-key=sk-123", STREAMED, turn)
    assert "sk-123" not in line and "session:s-1" not in line


def test_a_forwarded_request_reads_as_forwarded() -> None:
    turn = report(NONE, "http 200", attempt("team-a", "http 200"))
    line = request_line("GET", "/v1/models", Answered(200, first_s=0.004, total_s=0.004), turn)
    assert line == "GET /v1/models: 200 forwarded · account team-a · no affinity · 4 ms"
    cached = report(NONE, "cached 200")
    assert "200 from the cache" in request_line("GET", "/v1/models", Answered(200), cached)


def test_a_client_websocket_is_one_line_for_all_its_turns() -> None:
    turns = [
        report(HARD, "response.completed", attempt("team-a", "response.completed")),
        report(HARD, "response.completed", attempt("team-a", "response.completed")),
    ]
    line = socket_line("GET", "/backend-api/codex/responses", turns, 12.5)
    assert line == (
        "GET /backend-api/codex/responses: WebSocket, 2 turns (2 response.completed) · "
        "account team-a · hard affinity · open 12500 ms"
    )
    refused = report(HARD, "error", code="owner_unavailable")
    refused.status = 502
    assert socket_line("GET", "/v1/responses", [refused], 0.2).startswith(
        "GET /v1/responses: 502 owner_unavailable"
    )
