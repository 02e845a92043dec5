"""OpenAI-style HTTP error answers for every way a request fails before any event."""

from __future__ import annotations

import json
from typing import Any

import pytest
from responses_ws_bridge.core import openai_errors
from responses_ws_bridge.core.create_request import BadRequest
from responses_ws_bridge.core.failures import UpstreamErrorEvent
from responses_ws_bridge.core.openai_errors import HttpError, error_body
from responses_ws_bridge.core.retry_policy import FailHttp
from responses_ws_bridge.core.upstream_events import MAX_RESET_S, parse_error_event
from responses_ws_bridge.local import response_events

JSON = ("content-type", "application/json")
SECRET = "sk-proj-SECRETsecret123"


def error_of(err: HttpError) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(err.body)
    assert list(body) == ["error"]
    error: dict[str, Any] = body["error"]
    return error


def test_error_body_shape() -> None:
    assert json.loads(error_body("m", type_="t", code="c")) == {
        "error": {"message": "m", "type": "t", "code": "c", "param": None}
    }
    assert json.loads(error_body("m", type_="t", code=None, param="p"))["error"]["param"] == "p"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ((), (JSON,)),
        ((("retry-after", "1"),), (JSON, ("retry-after", "1"))),
        ((("Content-Type", "application/json"),), (("Content-Type", "application/json"),)),
    ],
)
def test_http_error_always_says_json(
    headers: tuple[tuple[str, str], ...], expected: tuple[tuple[str, str], ...]
) -> None:
    assert HttpError(400, b"{}", headers).headers == expected


# (constructor result, status, type, code, message fragment, extra headers)
SIMPLE_CASES = [
    (
        openai_errors.bad_request(
            BadRequest(400, "invalid_type", "stream must be a boolean", "stream")
        ),
        400,
        "invalid_request_error",
        "invalid_type",
        "stream must be a boolean",
        (),
    ),
    (
        openai_errors.bad_request(BadRequest(413, "request_too_large", "too big")),
        413,
        "invalid_request_error",
        "request_too_large",
        "too big",
        (),
    ),
    (
        openai_errors.request_too_large(2_000_000, 1_000_000),
        413,
        "invalid_request_error",
        "request_too_large",
        "2000000 bytes; the bridge accepts at most 1000000",
        (),
    ),
    (
        openai_errors.unauthorized_client_key(),
        401,
        "invalid_request_error",
        "invalid_client_key",
        "client key",
        (),
    ),
    (
        openai_errors.upstream_unreachable(f"connect to wss://u:{SECRET}@host failed"),
        502,
        "upstream_error",
        "upstream_unreachable",
        "could not reach the upstream",
        (),
    ),
    (
        openai_errors.upstream_timeout("no 101 within 10s"),
        502,
        "upstream_error",
        "upstream_timeout",
        "no 101 within 10s",
        (),
    ),
    (
        openai_errors.upstream_closed(1011, "internal error"),
        502,
        "upstream_error",
        "upstream_closed",
        "(close code 1011: internal error)",
        (),
    ),
    (
        openai_errors.upstream_closed(None, ""),
        502,
        "upstream_error",
        "upstream_closed",
        "(connection lost)",
        (),
    ),
    (
        openai_errors.all_accounts_cooling(30),
        429,
        "rate_limit_error",
        "all_accounts_cooling_down",
        "cooling down",
        (("retry-after", "30"),),
    ),
    (
        openai_errors.all_accounts_cooling(0),
        429,
        "rate_limit_error",
        "all_accounts_cooling_down",
        "cooling down",
        (("retry-after", "1"),),
    ),
    (
        openai_errors.no_account(),
        503,
        "server_error",
        "no_account_available",
        "no upstream account",
        (),
    ),
    (
        openai_errors.owner_unavailable("team-a", f"handshake 401 with {SECRET}"),
        502,
        "upstream_error",
        "owner_unavailable",
        "bound to account 'team-a'",
        (),
    ),
    (
        openai_errors.state_store_unavailable(),
        503,
        "server_error",
        "state_store_unavailable",
        "state store is unavailable",
        (("retry-after", "1"),),
    ),
    (
        openai_errors.bridge_not_ready(),
        503,
        "server_error",
        "bridge_not_ready",
        "starting",
        (("retry-after", "1"),),
    ),
]


@pytest.mark.parametrize(
    ("err", "status", "type_", "code", "fragment", "extra"),
    SIMPLE_CASES,
    ids=[c[3] for c in SIMPLE_CASES],
)
def test_constructor(
    err: HttpError,
    status: int,
    type_: str,
    code: str,
    fragment: str,
    extra: tuple[tuple[str, str], ...],
) -> None:
    assert err.status == status
    assert err.headers == (JSON, *extra)
    error = error_of(err)
    assert (error["type"], error["code"]) == (type_, code)
    assert fragment in error["message"]
    assert SECRET not in err.body.decode()


def test_bad_request_keeps_the_param() -> None:
    err = openai_errors.bad_request(BadRequest(400, "unsupported_parameter", "no", "background"))
    assert error_of(err)["param"] == "background"


UPSTREAM_401 = json.dumps(response_events.http_error_body(401, "Incorrect API key")).encode()
UPSTREAM_429 = json.dumps(response_events.http_error_body(429, "slow down")).encode()


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected_status", "expected_body", "expected_headers"),
    [
        (401, UPSTREAM_401, {}, 401, json.loads(UPSTREAM_401), ()),
        (403, b'{"error":"forbidden"}', {"Retry-After": "5"}, 403, {"error": "forbidden"}, ()),
        (
            429,
            UPSTREAM_429,
            {"Retry-After": "12", "x-ratelimit-remaining": "0", "set-cookie": "a=b"},
            429,
            json.loads(UPSTREAM_429),
            (("retry-after", "12"),),
        ),
        (
            401,
            b'{"error":{"message":"bad key ' + SECRET.encode() + b'"}}',
            {},
            401,
            {"error": {"message": "bad key <redacted>"}},
            (),
        ),
    ],
)
def test_upstream_rejected_keeps_client_facing_statuses_and_their_json_body(
    status: int,
    body: bytes,
    headers: dict[str, str],
    expected_status: int,
    expected_body: dict[str, Any],
    expected_headers: tuple[tuple[str, str], ...],
) -> None:
    err = openai_errors.upstream_rejected(status, body, headers)
    assert err.status == expected_status
    assert json.loads(err.body) == expected_body
    assert err.headers == (JSON, *expected_headers)


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected_code", "expected_headers"),
    [
        (401, None, {}, "upstream_rejected", ()),
        (403, b"<html>Forbidden</html>", {}, "upstream_rejected", ()),
        (429, b"[]", {"retry-after": "3"}, "upstream_rejected", (("retry-after", "3"),)),
        # A 429 always says when to come back (the default when the upstream did not).
        (429, b'{"message":"x"}', {}, "upstream_rejected", (("retry-after", "60"),)),
        # ...and never later than a spent weekly window.
        (
            429,
            b"[]",
            {"retry-after": "99999999"},
            "upstream_rejected",
            (("retry-after", "604800"),),
        ),
        (429, b"[]", {"retry-after": "1e999"}, "upstream_rejected", (("retry-after", "60"),)),
    ],
)
def test_upstream_rejected_without_a_json_error_body(
    status: int,
    body: bytes | None,
    headers: dict[str, str],
    expected_code: str,
    expected_headers: tuple[tuple[str, str], ...],
) -> None:
    err = openai_errors.upstream_rejected(status, body, headers)
    assert err.status == status
    assert err.headers == (JSON, *expected_headers)
    error = error_of(err)
    assert error["code"] == expected_code
    assert f"HTTP {status}" in error["message"]


@pytest.mark.parametrize("status", [400, 413, 414, 431])
def test_a_request_refused_for_its_size_or_headers_keeps_the_upstreams_answer(status: int) -> None:
    body = json.dumps(response_events.http_error_body(status, code="too_big")).encode()
    err = openai_errors.upstream_rejected(status, body, {"Retry-After": "9", "x-a": "b"})
    assert err.status == status
    assert err.headers == (JSON,)
    assert error_of(err)["code"] == "too_big"


@pytest.mark.parametrize("status", [404, 426, 500, 502, 503])
def test_upstream_rejected_other_statuses_become_502(status: int) -> None:
    body = json.dumps(response_events.http_error_body(status)).encode()
    err = openai_errors.upstream_rejected(status, body, {"Retry-After": "9", "x-a": "b"})
    assert err.status == 502
    assert err.headers == (JSON,)
    error = error_of(err)
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_handshake_rejected")
    assert f"HTTP {status}" in error["message"]


def event(frame: dict[str, Any]) -> UpstreamErrorEvent:
    parsed = parse_error_event(json.dumps(frame))
    assert parsed is not None
    return parsed


@pytest.mark.parametrize(
    ("ev", "status", "error", "headers"),
    [
        (
            event(response_events.rate_limit_event(4)),
            429,
            {
                "type": "requests",
                "code": "rate_limit_exceeded",
                "message": "Rate limit reached. Please try again in 4s.",
                "param": None,
            },
            (("retry-after", "4"),),
        ),
        (
            event(response_events.error_event(400, "bad_model", "nope", param="model")),
            400,
            {
                "type": "invalid_request_error",
                "code": "bad_model",
                "message": "nope",
                "param": "model",
            },
            (),
        ),
        (
            event({"type": "error", "code": "server_error", "message": "boom"}),
            502,
            {"type": "upstream_error", "code": "server_error", "message": "boom", "param": None},
            (),
        ),
        (
            event({"type": "error", "status": 200, "error": {"message": "odd", "x": 1}}),
            502,
            {"message": "odd", "x": 1, "code": None, "param": None, "type": "upstream_error"},
            (),
        ),
        (
            event({"type": "error", "status": 429, "error": {"code": "usage_limit_reached"}}),
            429,
            {
                "code": "usage_limit_reached",
                "message": "the upstream reported an error",
                "param": None,
                "type": "rate_limit_error",
            },
            (("retry-after", "60"),),
        ),
        # A rate-limit event without a status is still a 429 with Retry-After.
        (
            event({"type": "error", "error": {"code": "rate_limit_exceeded", "message": "slow"}}),
            429,
            {
                "code": "rate_limit_exceeded",
                "message": "slow",
                "param": None,
                "type": "rate_limit_error",
            },
            (("retry-after", "60"),),
        ),
        (
            event(
                {
                    "type": "error",
                    "error": {"code": "usage_limit_reached", "type": "usage_limit"},
                    "headers": {"retry-after": "9999999999"},
                }
            ),
            429,
            {
                "code": "usage_limit_reached",
                "type": "usage_limit",
                "message": "the upstream reported an error",
                "param": None,
            },
            (("retry-after", "604800"),),
        ),
        (
            event({"type": "error", "status": 401, "error": {"message": f"key {SECRET} revoked"}}),
            401,
            {
                "message": "key <redacted> revoked",
                "code": None,
                "param": None,
                "type": "upstream_error",
            },
            (),
        ),
    ],
)
def test_from_error_event(
    ev: UpstreamErrorEvent,
    status: int,
    error: dict[str, Any],
    headers: tuple[tuple[str, str], ...],
) -> None:
    err = openai_errors.from_error_event(ev)
    assert err.status == status
    assert error_of(err) == error
    assert err.headers == (JSON, *headers)


@pytest.mark.parametrize(
    ("value", "fallback", "wall_now", "expected"),
    [
        ("3", None, None, "3"),
        ("0.2", None, None, "1"),
        ("604801", None, None, "604800"),
        ("inf", 5.0, None, "5"),
        ("-4", None, None, None),
        ("soon", 7.0, None, "7"),
        ("Thu, 01 Jan 1970 00:01:40 GMT", None, 40.0, "60"),
        ("Fri, 31 Dec 9999 23:59:59 GMT", None, 0.0, "604800"),
        (None, None, None, None),
        (None, 1e12, None, "604800"),
    ],
)
def test_retry_after_header_is_clamped(
    value: str | None, fallback: float | None, wall_now: float | None, expected: str | None
) -> None:
    from responses_ws_bridge.core.upstream_events import retry_after_header

    assert retry_after_header(value, fallback_s=fallback, wall_now=wall_now) == expected


def test_owner_cooling_names_the_owner_not_the_pool() -> None:
    err = openai_errors.owner_cooling("team-a", 12.2)
    body = json.loads(err.body)["error"]
    assert err.status == 429 and body["code"] == "owner_cooling_down"
    assert "team-a" in body["message"] and "every" not in body["message"]
    assert ("retry-after", "13") in err.headers


def test_a_decisions_retry_after_is_clamped_to_seven_days() -> None:
    error = openai_errors.for_decision(FailHttp(429, "rate_limit_exceeded", retry_after_s=1e12))
    assert dict(error.headers)["retry-after"] == str(int(MAX_RESET_S))


def test_a_pool_out_on_usage_limits_is_answered_as_codex_cli_reads_it() -> None:
    from responses_ws_bridge.core.retry_policy import FailHttp

    fail = FailHttp(429, "usage_limit_reached", 90.2, message="limit", resets_at=1_800_000_090.2)
    err = openai_errors.for_decision(fail)
    assert err.status == 429
    assert ("retry-after", "91") in err.headers
    error = error_of(err)
    # Codex CLI keys its usage message on `type`, and reads `resets_at` (epoch seconds).
    assert (error["type"], error["code"], error["resets_at"]) == (
        "usage_limit_reached",
        "usage_limit_reached",
        1_800_000_091,
    )
    assert "plan_type" not in error  # an unknown plan would make Codex CLI retry instead


def test_a_rate_limit_event_passes_its_header_families_on() -> None:
    ev = UpstreamErrorEvent(
        "usage_limit_reached",
        429,
        "usage_limit_reached",
        headers={
            "retry-after": "30",
            "x-codex-primary-used-percent": "100",
            "x-codex-bengalfox-primary-used-percent": "80",
            "x-codex-bengalfox-limit-name": "sonic",
            "x-codex-promo-message": "more?",
            "x-internal": "no",
        },
    )
    headers = dict(openai_errors.from_error_event(ev).headers)
    assert headers["retry-after"] == "30"
    assert headers["x-codex-primary-used-percent"] == "100"
    assert headers["x-codex-bengalfox-primary-used-percent"] == "80"
    assert headers["x-codex-bengalfox-limit-name"] == "sonic"
    assert headers["x-codex-promo-message"] == "more?"
    assert "x-internal" not in headers


def test_an_overload_that_outlasts_the_retries_is_a_503_with_the_upstreams_code() -> None:
    from responses_ws_bridge.core.retry_policy import FailHttp

    ev = UpstreamErrorEvent("server_is_overloaded", None, "server_error", "busy")
    err = openai_errors.for_failure(ev, FailHttp(503, "server_is_overloaded"), passthrough=False)
    assert err.status == 503
    assert error_of(err)["code"] == "server_is_overloaded"
