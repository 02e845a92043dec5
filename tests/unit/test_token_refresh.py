"""Token refresh decisions: JWT expiry, when to refresh, the request, the answers, the state."""

from __future__ import annotations

import json

import pytest
from harness.oauth_server import unsigned_jwt
from responses_ws_bridge.core.token_refresh import (
    CODEX_CLIENT_ID,
    Refreshed,
    Refused,
    Tokens,
    fingerprint,
    jwt_expiry,
    needs_refresh,
    parse_refresh_response,
    refresh_request_body,
)

NOW = 1_800_000_000.0
OLD = Tokens("access-old", "refresh-old")


@pytest.mark.parametrize(
    ("token", "exp"),
    [
        (unsigned_jwt({"exp": 1234}), 1234.0),
        (unsigned_jwt({"sub": "x"}), None),
        (unsigned_jwt({"exp": "soon"}), None),
        (unsigned_jwt({"exp": True}), None),
        ("opaque-token", None),
        ("a.b.c", None),
        ("a.!!!.c", None),
        ("", None),
    ],
)
def test_jwt_expiry(token: str, exp: float | None) -> None:
    assert jwt_expiry(token) == exp


@pytest.mark.parametrize(
    ("access", "has_refresh", "due"),
    [
        (unsigned_jwt({"exp": NOW + 3600}), True, False),
        (unsigned_jwt({"exp": NOW + 299}), True, True),  # inside the 300 s margin
        (unsigned_jwt({"exp": NOW - 1}), True, True),
        (unsigned_jwt({"exp": NOW - 1}), False, False),  # nothing to refresh with
        ("opaque", True, False),  # no exp: refreshed on a 401 only
        (None, True, True),
        ("", True, True),
    ],
)
def test_needs_refresh(access: str | None, has_refresh: bool, due: bool) -> None:
    assert needs_refresh(access, has_refresh_token=has_refresh, wall_now=NOW) is due


def test_request_body() -> None:
    assert json.loads(refresh_request_body("rt", None)) == {
        "grant_type": "refresh_token",
        "client_id": CODEX_CLIENT_ID,
        "refresh_token": "rt",
        "scope": "openid profile email",
    }
    assert json.loads(refresh_request_body("rt", "my-client"))["client_id"] == "my-client"


def ok(body: dict[str, object]) -> bytes:
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (
            200,
            ok({"access_token": "a2", "refresh_token": "r2", "id_token": "i2"}),
            Refreshed(Tokens("a2", "r2", "i2")),
        ),
        (200, ok({"access_token": "a2"}), Refreshed(Tokens("a2", "refresh-old"))),
        (200, ok({"nothing": 1}), Refused("malformed_response", permanent=False)),
        (400, ok({"error": "invalid_grant"}), Refused("invalid_grant", permanent=True)),
        (
            401,
            ok({"error": {"code": "refresh_token_reused", "message": "x"}}),
            Refused("refresh_token_reused", permanent=True),
        ),
        (
            401,
            ok({"error": {"code": "refresh_token_expired"}}),
            Refused("refresh_token_expired", permanent=True),
        ),
        (500, b"oops", Refused("http_500", permanent=False)),
        (429, ok({"error": "slow down please"}), Refused("unrecognized_error", permanent=False)),
        # An endpoint that echoes what it was sent: its code is not one on the known list.
        (
            400,
            ok({"error": {"code": "xrt-orig-x-secret0123", "message": "xrt-orig-x-secret0123"}}),
            Refused("unrecognized_error", permanent=False),
        ),
        (503, ok({"error": "temporarily_unavailable"}), Refused("temporarily_unavailable", False)),
        (None, b"", Refused("unreachable", permanent=False)),
    ],
)
def test_answers(status: int | None, body: bytes, outcome: object) -> None:
    got = parse_refresh_response(status, body, old=OLD)
    if isinstance(outcome, Refreshed):
        assert isinstance(got, Refreshed) and got.tokens == outcome.tokens
    else:
        assert got == outcome


def test_secrets_never_show_in_reprs() -> None:
    tokens = Tokens("access-secret", "refresh-secret", "id-secret")
    assert "secret" not in repr(tokens) + str(tokens) + repr(Refreshed(tokens))


def test_fingerprint_is_short_and_not_the_secret() -> None:
    tag = fingerprint("file-refresh")
    assert len(tag) == 16 and "file" not in tag
    assert tag == fingerprint("file-refresh") != fingerprint("file-refresh2")
