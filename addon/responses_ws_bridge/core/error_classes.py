"""What an upstream error says about the account and the request: one table.

An `error` event, or a `response.failed` before any output, carries a code,
a type and a message. `classify` maps them to one `ErrorClass`, which the
retry table (`retry_policy`), the account pool's health rules and the relay
act on. Rows are tried top to bottom; the first match wins.

| class            | matched by                               | retry                 | health   |
|------------------|------------------------------------------|-----------------------|----------|
| CONNECTION_LIMIT | code `websocket_connection_limit_reached`| free: a new socket on | neutral  |
|                  | (status 400 or 429 alike: no rate limit) | the same account      |          |
| ACCOUNT_BOUND    | code `invalid_encrypted_content`         | never: relayed with   | neutral  |
|                  |                                          | its code, not moved   |          |
| AUTH_PERMANENT   | code `token_expired`,                    | no refresh; hard: 502 | disabled |
|                  | `refresh_token_expired`, `_reused`,      | owner_unavailable;    |          |
|                  | `_invalidated`                           | soft/none: another    |          |
| AUTH             | code `invalid_api_key`,                  | ChatGPT account:      | disabled |
|                  | `token_invalidated`, `token_revoked`;    | refresh, once more    | if that  |
|                  | type `authentication_error`              | (free); then as above | fails    |
| RATE_LIMIT       | code `rate_limit_exceeded`,              | hard: its 429 passed  | cooling  |
|                  | `usage_limit_reached`,                   | on; soft/none:        | until    |
|                  | `insufficient_quota`; type `usage_..`    | another account       | reset    |
| OVERLOADED       | code `server_is_overloaded`,             | hard: the owner again | neutral  |
|                  | `overloaded_error`, `slow_down`; message | (backoff); soft/none: |          |
|                  | "Selected model is at capacity"          | another account       |          |
| OTHER            | anything else (400 invalid_request, ...) | never: relayed        | neutral  |

Only the classes in `RETRYABLE` are retried, and only before the client has
seen an event; OVERLOADED and AUTH often arrive after `response.created`,
which is why the relay holds that event back until the first output.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorClass(StrEnum):
    CONNECTION_LIMIT = "connection_limit"
    ACCOUNT_BOUND = "account_bound"
    AUTH_PERMANENT = "auth_permanent"
    AUTH = "auth"
    RATE_LIMIT = "rate_limit"
    OVERLOADED = "overloaded"
    OTHER = "other"


CONNECTION_LIMIT_CODE = "websocket_connection_limit_reached"
USAGE_LIMIT_CODE = "usage_limit_reached"
RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded", USAGE_LIMIT_CODE, "insufficient_quota"})
AUTH_CODES = frozenset({"invalid_api_key", "token_invalidated", "token_revoked"})
AUTH_TYPES = frozenset({"authentication_error"})
AUTH_PERMANENT_CODES = frozenset(
    {"token_expired", "refresh_token_expired", "refresh_token_reused", "refresh_token_invalidated"}
)
ACCOUNT_BOUND_CODES = frozenset({"invalid_encrypted_content"})
OVERLOADED_CODES = frozenset({"server_is_overloaded", "overloaded_error", "slow_down"})
_AT_CAPACITY = "selected model is at capacity"

RETRYABLE = frozenset(
    {
        ErrorClass.CONNECTION_LIMIT,
        ErrorClass.AUTH_PERMANENT,
        ErrorClass.AUTH,
        ErrorClass.RATE_LIMIT,
        ErrorClass.OVERLOADED,
    }
)
# The account cannot serve with the credential it has: it is disabled after them.
AUTH_CLASSES = frozenset({ErrorClass.AUTH, ErrorClass.AUTH_PERMANENT})


def classify(code: str | None, type_: str | None = None, message: str = "") -> ErrorClass:
    """The class of an upstream error (see the module table)."""
    if code == CONNECTION_LIMIT_CODE:
        return ErrorClass.CONNECTION_LIMIT
    if code in ACCOUNT_BOUND_CODES:
        return ErrorClass.ACCOUNT_BOUND
    if code in AUTH_PERMANENT_CODES:
        return ErrorClass.AUTH_PERMANENT
    if code in AUTH_CODES or type_ in AUTH_TYPES:
        return ErrorClass.AUTH
    if code in RATE_LIMIT_CODES or type_ == USAGE_LIMIT_CODE:
        return ErrorClass.RATE_LIMIT
    if code in OVERLOADED_CODES or _AT_CAPACITY in message.lower():
        return ErrorClass.OVERLOADED
    return ErrorClass.OTHER
