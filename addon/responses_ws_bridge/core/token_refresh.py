"""Refreshing ChatGPT access tokens: when, with what request, and what the answer means.

Pure decisions over plain values; the refresher in `shell.token_refresher`
does the I/O (one refresh at a time per account, persisted before use).

| situation                                   | decision                               |
|---------------------------------------------|----------------------------------------|
| no refresh token                            | never refresh                          |
| no access token, or a JWT whose `exp` is    | refresh before use                     |
| within `margin`                             |                                        |
| an access token that is not a JWT           | use it; refresh on a handshake 401     |
| handshake 401 with the token the attempt used | refresh, then retry once             |
| 200 with `access_token`                     | `Refreshed` (old refresh token kept if |
|                                             | none came back)                        |
| error `invalid_grant`, `refresh_token_      | `Refused(permanent=True)`: disable the |
| expired`, `_reused`, `_invalidated`         | account                                |
| anything else (5xx, network, garbage)       | `Refused(permanent=False)`: try later  |
| an error code not on the known list          | named `unrecognized_error`: an endpoint |
|                                             | that echoes the token never reaches a log |

Refresh tokens rotate and are single-use: sending a spent one can revoke the
whole login, which is why the shell persists the new pair before using it.
Which rotated chain an account uses, across restarts and instances, is
`core.token_chain`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_TOKEN_URL = "https://auth.openai.com/oauth/token"
# Codex CLI's public OAuth client.
CODEX_CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
REFRESH_SCOPE = "openid profile email"
DEFAULT_MARGIN_S = 300.0
PERMANENT_CODES = frozenset(
    {"invalid_grant", "refresh_token_expired", "refresh_token_reused", "refresh_token_invalidated"}
)
# The codes an answer may name in a log line or a client's error (RFC 6749 §5.2, RFC 6750,
# OpenAI's own). Anything else is `unrecognized_error`: an endpoint that echoes what it was
# sent (the refresh token) must not put it in the log.
KNOWN_CODES = PERMANENT_CODES | frozenset(
    {
        "invalid_request",
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "access_denied",
        "server_error",
        "temporarily_unavailable",
        "invalid_token",
        "insufficient_scope",
        "token_expired",
        "rate_limit_exceeded",
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "rate_limit_error",
        "api_error",
    }
)
UNRECOGNIZED_CODE = "unrecognized_error"


@dataclass(frozen=True, repr=False)
class Tokens:
    """The credentials of one ChatGPT login; never printed."""

    access_token: str
    refresh_token: str
    id_token: str | None = None

    def __repr__(self) -> str:
        return "Tokens(<redacted>)"

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class Refreshed:
    tokens: Tokens

    def __repr__(self) -> str:
        return "Refreshed(<redacted>)"


@dataclass(frozen=True)
class Refused:
    """The token endpoint said no. `reason` is its error code (no secret), `permanent` as above."""

    reason: str
    permanent: bool


RefreshOutcome = Refreshed | Refused


def jwt_claims(token: str) -> Mapping[str, Any] | None:
    """The payload of a JWT, read without verifying it (only its `exp` is wanted)."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (ValueError, UnicodeEncodeError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


def jwt_expiry(token: str) -> float | None:
    """A JWT's `exp` (epoch seconds), or None when the token is not a JWT or has none."""
    claims = jwt_claims(token)
    exp = claims.get("exp") if claims is not None else None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    return float(exp)


def needs_refresh(
    access_token: str | None,
    *,
    has_refresh_token: bool,
    wall_now: float,
    margin_s: float = DEFAULT_MARGIN_S,
) -> bool:
    """Whether to refresh before using `access_token` (see the module table)."""
    if not has_refresh_token:
        return False
    if not access_token:
        return True
    exp = jwt_expiry(access_token)
    return exp is not None and exp - margin_s <= wall_now


def refresh_request_body(refresh_token: str, client_id: str | None) -> bytes:
    """The JSON body of the refresh `POST` to the token endpoint."""
    return json.dumps(
        {
            "grant_type": "refresh_token",
            "client_id": client_id or CODEX_CLIENT_ID,
            "refresh_token": refresh_token,
            "scope": REFRESH_SCOPE,
        }
    ).encode()


def parse_refresh_response(
    status: int | None, body: bytes, *, old: Tokens | None
) -> RefreshOutcome:
    """What the token endpoint's answer means (`status` None: no answer at all)."""
    data = _json(body)
    if status == 200 and isinstance(data, Mapping):
        access = data.get("access_token")
        if isinstance(access, str) and access:
            refresh = data.get("refresh_token")
            if not (isinstance(refresh, str) and refresh):
                if old is None:
                    return Refused("no_refresh_token_returned", permanent=False)
                refresh = old.refresh_token
            id_token = data.get("id_token")
            return Refreshed(
                Tokens(
                    access, refresh, id_token if isinstance(id_token, str) and id_token else None
                )
            )
        return Refused("malformed_response", permanent=False)
    code = error_code(data)
    if code is not None and code in PERMANENT_CODES:
        return Refused(code, permanent=True)
    if status is None:
        return Refused("unreachable", permanent=False)
    return Refused(code or f"http_{status}", permanent=False)


def error_code(data: Any) -> str | None:
    """The error code of an OAuth (`{"error": "invalid_grant"}`) or OpenAI-style error body."""
    if not isinstance(data, Mapping):
        return None
    error = data.get("error")
    if isinstance(error, str):
        return _code(error)
    if isinstance(error, Mapping):
        for name in ("code", "type"):
            value = error.get(name)
            if isinstance(value, str) and value:
                return _code(value)
    code = data.get("code")
    return _code(code) if isinstance(code, str) and code else None


def _code(value: str) -> str:
    # Only a code from the known list is ever shown: no text of the endpoint's own.
    cleaned = value.strip().lower()
    return cleaned if cleaned in KNOWN_CODES else UNRECOGNIZED_CODE


def fingerprint(secret: str) -> str:
    """A short, non-reversible tag for a token: which one a stored pair came from, or was used."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None
