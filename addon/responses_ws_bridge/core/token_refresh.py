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

Refresh tokens rotate and are single-use: sending a spent one can revoke the
whole login, which is why the shell persists the new pair before using it.
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
    # Only an identifier-like code is ever shown: no free text from the endpoint.
    cleaned = "".join(c for c in value.strip().lower() if c.isalnum() or c in "_-.")
    return cleaned[:64] or "error"


def fingerprint(secret: str) -> str:
    """A short, non-reversible tag for a token: which one a stored pair came from, or was used."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def tokens_to_use(file_tokens: Tokens, stored: Mapping[str, Any] | None) -> Tokens:
    """The tokens an account starts with: the rotated pair stored for it, unless the file moved on.

    A stored pair records the fingerprint of the accounts file's refresh token
    it descends from. When the file still holds that token, it is spent: the
    stored pair is the live one. When the operator put a new refresh token in
    the file, the file wins.
    """
    if not isinstance(stored, Mapping) or stored.get("origin") != fingerprint(
        file_tokens.refresh_token
    ):
        return file_tokens
    access, refresh = stored.get("access_token"), stored.get("refresh_token")
    if not (isinstance(access, str) and access and isinstance(refresh, str) and refresh):
        return file_tokens
    id_token = stored.get("id_token")
    return Tokens(access, refresh, id_token if isinstance(id_token, str) else None)


def stored_entry(tokens: Tokens, *, origin: str, wall_now: float) -> dict[str, Any]:
    """One account's entry in the rotated-token state file."""
    entry: dict[str, Any] = {
        "origin": origin,
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "refreshed_at": int(wall_now),
    }
    if tokens.id_token is not None:
        entry["id_token"] = tokens.id_token
    return entry


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None
