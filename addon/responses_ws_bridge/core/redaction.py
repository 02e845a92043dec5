"""Credential redaction for recorded flows, and reading it back.

Recorded upstream sessions keep which account was used but never its secret:
`Authorization` becomes `Bearer <redacted:ACCOUNT_ID>` (`<redacted:client>` for
the client's own credential in pass-through mode), credential-like headers
lose their values, and known secrets, API keys and JWTs are cut out of every
header value. Pure functions over plain values.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from responses_ws_bridge.core.handshake_headers import redact_secrets

REDACTED = "<redacted>"
# The account label of the client's own credential (pass-through mode).
CLIENT_ACCOUNT = "client"

# Their whole value is a credential, whatever it looks like.
CREDENTIAL_HEADERS = frozenset(
    {
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "openai-api-key",
        "proxy-authorization",
    }
)

_REDACTED_AUTHORIZATION = re.compile(r"\s*(\S+)\s+<redacted:(.*)>\s*")


def redacted_authorization(account_id: str | None, scheme: str = "Bearer") -> str:
    """The recorded form of an Authorization value used for `account_id`."""
    return f"{scheme} <redacted:{account_id if account_id is not None else CLIENT_ACCOUNT}>"


def account_from_authorization(value: str | None) -> str | None:
    """The account id in a redacted Authorization value; None when it is not one.

    The client's own credential comes back as `CLIENT_ACCOUNT`.
    """
    if value is None:
        return None
    match = _REDACTED_AUTHORIZATION.fullmatch(value)
    if match is None or match.group(1).lower() != "bearer":
        return None
    return match.group(2)


def redact_text(text: str, secrets: Collection[str]) -> str:
    """`text` with every occurrence of a known secret replaced by `<redacted>`."""
    # Longest first, so that a secret containing another is cut out whole.
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def redact_headers(
    headers: Sequence[tuple[str, str]],
    *,
    account_id: str | None,
    secrets: Collection[str],
) -> list[tuple[str, str]]:
    """The headers, in order, as they may be recorded.

    `account_id` is the account whose credential `Authorization` carries; None
    means it is the client's own (pass-through mode).
    """
    out: list[tuple[str, str]] = []
    for name, value in headers:
        low = name.lower()
        if low == "authorization":
            scheme = value.split(None, 1)[0] if value.strip() else "Bearer"
            # Only the scheme survives: a token without one is still a token.
            if scheme.lower() != "bearer" and " " not in value.strip():
                scheme = "Bearer"
            out.append((name, redacted_authorization(account_id, scheme)))
        elif low in CREDENTIAL_HEADERS:
            out.append((name, REDACTED))
        else:
            out.append((name, redact_secrets(redact_text(value, secrets))))
    return out
