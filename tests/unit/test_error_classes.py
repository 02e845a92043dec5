"""The upstream error table (`core.error_classes`), row by row, and the shapes errors come in."""

from __future__ import annotations

import json
from typing import Any

import pytest
from responses_ws_bridge.core.error_classes import RETRYABLE, ErrorClass, classify
from responses_ws_bridge.core.failures import (
    UpstreamErrorEvent,
    is_account_neutral,
    is_auth_rejection,
    is_connection_limit,
    is_rate_limit,
)
from responses_ws_bridge.core.upstream_events import (
    header_values,
    parse_error_event,
    parse_failed_response,
)

C = ErrorClass

# (code, type, message, class): every row of the module table, and its edges.
TABLE: list[tuple[str | None, str | None, str, ErrorClass]] = [
    ("websocket_connection_limit_reached", None, "", C.CONNECTION_LIMIT),
    # The socket age limit wins over anything a 429's type would say.
    ("websocket_connection_limit_reached", "usage_limit_reached", "", C.CONNECTION_LIMIT),
    ("invalid_encrypted_content", "invalid_request_error", "", C.ACCOUNT_BOUND),
    ("invalid_encrypted_content", "authentication_error", "", C.ACCOUNT_BOUND),
    ("token_expired", None, "", C.AUTH_PERMANENT),
    ("token_expired", "authentication_error", "", C.AUTH_PERMANENT),
    ("refresh_token_expired", None, "", C.AUTH_PERMANENT),
    ("refresh_token_reused", None, "", C.AUTH_PERMANENT),
    ("refresh_token_invalidated", None, "", C.AUTH_PERMANENT),
    ("invalid_api_key", "invalid_request_error", "", C.AUTH),
    ("token_invalidated", None, "", C.AUTH),
    ("token_revoked", None, "", C.AUTH),
    (None, "authentication_error", "Your session has ended.", C.AUTH),
    ("rate_limit_exceeded", "requests", "", C.RATE_LIMIT),
    ("usage_limit_reached", None, "", C.RATE_LIMIT),
    ("insufficient_quota", None, "", C.RATE_LIMIT),
    (None, "usage_limit_reached", "The usage limit has been reached", C.RATE_LIMIT),
    ("server_is_overloaded", "server_error", "", C.OVERLOADED),
    ("overloaded_error", None, "", C.OVERLOADED),
    ("slow_down", None, "", C.OVERLOADED),
    (
        "invalid_request_error",
        "invalid_request_error",
        "Selected model is at capacity. Please try a different model.",
        C.OVERLOADED,
    ),
    ("invalid_request_error", "invalid_request_error", "Unsupported parameter", C.OTHER),
    ("previous_response_not_found", "invalid_request_error", "", C.OTHER),
    ("context_length_exceeded", None, "", C.OTHER),
    (None, None, "", C.OTHER),
]


@pytest.mark.parametrize(("code", "type_", "message", "expected"), TABLE)
def test_the_table(code: str | None, type_: str | None, message: str, expected: C) -> None:
    assert classify(code, type_, message) is expected


def test_only_errors_about_the_account_or_the_socket_are_retryable() -> None:
    assert {C.OTHER, C.ACCOUNT_BOUND}.isdisjoint(RETRYABLE)
    assert {C.CONNECTION_LIMIT, C.AUTH, C.AUTH_PERMANENT, C.RATE_LIMIT, C.OVERLOADED} == RETRYABLE


@pytest.mark.parametrize(
    ("kind", "neutral", "auth", "limit"),
    [
        (C.CONNECTION_LIMIT, True, False, False),
        (C.ACCOUNT_BOUND, True, False, False),
        (C.AUTH_PERMANENT, False, True, False),
        (C.AUTH, False, True, False),
        (C.RATE_LIMIT, False, False, True),
        (C.OVERLOADED, True, False, False),
        (C.OTHER, False, False, False),
    ],
)
def test_health_follows_the_class(kind: C, neutral: bool, auth: bool, limit: bool) -> None:
    code = next(c for c, t, m, k in TABLE if k is kind)
    type_, message = next((t, m) for c, t, m, k in TABLE if k is kind)
    failure = UpstreamErrorEvent(code, 400, type_, message or "x")
    assert failure.kind is kind
    assert is_account_neutral(failure) is neutral
    assert is_auth_rejection(failure) is auth
    assert is_rate_limit(failure) is limit


def frame(**event: Any) -> str:
    return json.dumps({"type": "error", **event})


ERROR = {"type": "usage_limit_reached", "code": "usage_limit_reached", "message": "limit"}


@pytest.mark.parametrize(
    "text",
    [
        frame(status=429, error=ERROR),
        frame(status_code=429, error=ERROR),
        frame(status="429", error=ERROR),
        frame(status_code=429, body={"error": ERROR}),
        frame(body={"status": 429, "error": ERROR}),
    ],
    ids=["status", "status_code", "status-string", "body.error", "body.status"],
)
def test_every_shape_of_an_error_frame_reads_alike(text: str) -> None:
    parsed = parse_error_event(text)
    assert parsed is not None
    assert (parsed.status, parsed.code, parsed.type) == (429, "usage_limit_reached", ERROR["type"])
    assert parsed.error_object == ERROR
    assert parsed.is_rate_limit


@pytest.mark.parametrize("status", [400, 429])
def test_the_socket_age_limit_is_never_a_rate_limit(status: int) -> None:
    parsed = parse_error_event(
        frame(
            status=status,
            error={"type": "invalid_request_error", "code": "websocket_connection_limit_reached"},
        )
    )
    assert parsed is not None
    assert is_connection_limit(parsed) and not parsed.is_rate_limit


def test_a_headers_map_reads_as_an_http_client_would() -> None:
    assert header_values(
        {"retry-after": 30, "x-codex-primary-used-percent": 99.5, "x-flag": True, "x-o": {}}
    ) == {"retry-after": "30", "x-codex-primary-used-percent": "99.5", "x-flag": "true"}
    assert header_values(None) == {}


def test_a_rate_limit_frame_reads_its_reset_from_the_headers_map() -> None:
    parsed = parse_error_event(
        frame(status_code=429, body={"error": ERROR}, headers={"retry-after": 30}), wall_now=0.0
    )
    assert parsed is not None and parsed.retry_after_s == 30.0


def test_a_failed_response_carries_its_error() -> None:
    failed = json.dumps(
        {
            "type": "response.failed",
            "response": {
                "id": "resp_1",
                "status": "failed",
                "error": {"code": "server_is_overloaded", "message": "overloaded"},
            },
        }
    )
    parsed = parse_failed_response(failed)
    assert parsed is not None
    assert parsed.failed_response and parsed.kind is C.OVERLOADED
    assert parse_failed_response('{"type":"response.failed","response":{"error":null}}') is None
    assert parse_failed_response('{"type":"response.completed"}') is None
