"""What to do after a failed upstream attempt: the reconnect decision table.

A failed attempt is a plain `Failure` value; `decide()` maps it, the request's
affinity, whether the client has seen an event, and the attempt count to one
`Decision`. Everything here is pure and deterministic: jitter and wall-clock
time are arguments.

The table, while the client has seen no event and retries remain:

| failure                                     | HARD                        | SOFT / NONE |
|---------------------------------------------|-----------------------------|-------------|
| close 1011                                  | RetrySame(owner)            | RetryOther  |
| close 1000/1001/1005/1006/1012/1013/...,    | RetrySame(owner)            | RetrySame   |
| connection lost, connect error, no event    |                             |             |
| for `bridge_stream_idle_timeout` (silent)   |                             |             |
| handshake 5xx (or another unlisted status)  | RetrySame(owner)            | RetryOther  |
| handshake 401/403                           | FailHttp 502 owner_unavail. | RetryOther  |
| handshake 404/426 (no WebSocket there)      | FailHttp 502 owner_unavail. | RetryOther  |
| handshake 429, rate-limit error event       | FailHttp 429 (passed on)    | RetryOther  |
| handshake 400/413/414/431 (the request's    | FailHttp, the upstream's    | same        |
| size or headers refused)                    | status and body, no retry   |             |
| error event: socket age limit (`websocket_  | RetrySame(owner), no delay  | RetrySame,  |
| connection_limit_reached`)                  |                             | no delay    |
| error event or pre-output `response.failed` | RetrySame(owner), backoff;  | RetryOther  |
| overloaded (`error_classes.OVERLOADED`)     | spent: 503, passed on       |             |
| error event `invalid_api_key`/auth, or a    | FailHttp 502 owner_unavail. | RetryOther  |
| permanent auth code (after any refresh)     |                             |             |
| any other error event (e.g. 400, and        | Relay                       | Relay       |
| `invalid_encrypted_content`)                |                             |             |
| an event that cannot be relayed (binary,    | FailHttp 502 invalid_       | same        |
| not JSON, 1e999, a type with a line break)  | upstream_event              |             |
| no first event within the request's         | FailHttp 504 upstream_      | same        |
| `bridge_first_event_timeout`                | timeout, no retry           |             |
| no token: the refresh failed (not now)      | FailHttp 503 token_refresh_ | RetryOther  |
|                                             | failed (+ Retry-After)      |             |
| no token: the refresh was refused for good  | FailHttp 502 token_refresh_ | RetryOther  |
|                                             | failed                      |             |
| no token: the store's refresh lock is out   | FailHttp 503 state_store_   | RetryOther  |
| of reach                                    | unavailable                 |             |

A refresh failure is never retried on the same account within the request:
the refresher has its own backoff, and another try would only be another
refresh (or another wait for one).

A 1011 the bridge's own client sent (its keepalive gave up: `by_bridge`) is a
lost connection, like 1006: RetrySame, never a move, never a strike.

Free retries (`free_retry`), before the table, once each per request, on the
same account and without spending the budget: a reused socket found dead; the
socket's age limit (`websocket_connection_limit_reached`: a new socket); a
clean close 1000 before any event (a hand-off); a handshake 401 or an auth
error event after the account's access token was refreshed; a prewarm
(`generate: false`) whose socket failed after `response.created` (its empty
answer was held back, so sending it again is invisible to the client).

HARD never leaves the owner: when the owner cannot serve (disabled, cooling,
not a WebSocket endpoint) or the budget is spent, the request fails. SOFT/NONE
retry the same account after closes that say nothing against the account
(1000, 1001, 1005, 1006, 1012, 1013, connection lost, connect error): the
account is fine, and staying keeps a soft key's prompt cache warm; if the pool
no longer finds that account usable (`owner_usable` False) they move instead.
Budget spent: a rate-limit failure passes its 429 on, anything else is 502.
Once the client has seen an event nothing is replayed: an error event is
relayed as the terminal event it is, any other failure ends the stream with
`response.failed` (`stream_incomplete`, or `invalid_upstream_event` for an
event that cannot be relayed).
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from websockets.frames import CloseCode

from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.error_classes import AUTH_CLASSES, RETRYABLE, ErrorClass
from responses_ws_bridge.core.failures import (
    REFRESH_REFUSED,
    STATE_STORE_UNAVAILABLE,
    ConnectFailed,
    ConnectionLost,
    Failure,
    HandshakeRejected,
    InvalidUpstreamEvent,
    UpstreamClosed,
    UpstreamErrorEvent,
    UpstreamSilent,
    close_code_seen,
    describe,
    error_class,
    is_client_rejection,
    is_connection_limit,
    is_handoff,
    is_rate_limit,
    is_refresh_failure,
    retry_after_of,
)

DEFAULT_RETRY_BUDGET = 2


# --- reset times ----------------------------------------------------------------------------

_RESET_FIELDS = ("resets_in_seconds", "retry_after", "resets_at")
_TRY_AGAIN = re.compile(r"try again in (\d+(?:\.\d+)?)\s*(ms|s)\b", re.IGNORECASE)


def retry_after_from(
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None,
    body: Any,
    *,
    wall_now: float,
) -> float | None:
    """Seconds until a rate-limited account may be used again, if the upstream said.

    Looks, in order, at the `Retry-After` header (seconds or an HTTP date), then
    the error body (`resets_in_seconds`, `retry_after` in seconds, `resets_at`
    as epoch seconds; inside `error` first, then at the top level), then an
    OpenAI-style "try again in 1.5s" message. `wall_now` is epoch seconds, for
    the absolute forms. Past or unusable values count as not given.
    """
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
    for name, value in pairs:
        if name.lower() == "retry-after":
            delay = _retry_after_header(value, wall_now)
            if delay is not None:
                return delay
    data = _as_json(body)
    if not isinstance(data, Mapping):
        return None
    scopes = [data]
    if isinstance(data.get("error"), Mapping):
        scopes.insert(0, data["error"])
    for scope in scopes:
        for name in _RESET_FIELDS:
            seconds = _number(scope.get(name))
            if seconds is None:
                continue
            if name == "resets_at":
                seconds -= wall_now
            if seconds > 0:
                return seconds
    for scope in scopes:
        message = scope.get("message")
        if isinstance(message, str) and (m := _TRY_AGAIN.search(message)):
            seconds = float(m.group(1)) / (1000 if m.group(2).lower() == "ms" else 1)
            if seconds > 0:
                return seconds
    return None


def _retry_after_header(value: str, wall_now: float) -> float | None:
    seconds = _number(value.strip())
    if seconds is None:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - wall_now
    return seconds if seconds > 0 else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _as_json(body: Any) -> Any:
    if isinstance(body, bytes | str):
        try:
            return json.loads(body)
        except ValueError:
            return None
    return body


def handshake_rejected(
    status: int,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    body: bytes | None,
    *,
    wall_now: float,
) -> HandshakeRejected:
    """The failure for a rejected upgrade, with any reset time the upstream gave."""
    pairs = tuple(headers.items() if isinstance(headers, Mapping) else headers)
    delay = retry_after_from(pairs, body, wall_now=wall_now) if status == 429 else None
    return HandshakeRejected(status, pairs, body or b"", delay)


# --- decisions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrySame:
    """Try again on `account` after `delay_s`."""

    account: str
    delay_s: float


@dataclass(frozen=True)
class RetryOther:
    """Choose another account, excluding `exclude` for the rest of this request."""

    exclude: str


@dataclass(frozen=True)
class FailStreamIncomplete:
    """The client already saw events: end its stream with response.failed / stream_incomplete."""

    close_code: int | None
    message: str = field(default="", compare=False)


@dataclass(frozen=True)
class FailHttp:
    """Answer the client with an HTTP error (OpenAI-style body) before any event.

    `upstream_status` is the status the upstream answered the handshake with,
    if that is what failed (a pass-through shell may forward it as is).
    """

    status: int
    code: str
    retry_after_s: float | None = None
    upstream_status: int | None = None
    message: str = field(default="", compare=False)
    # Epoch seconds when a usage limit resets (`usage_limit_reached` answers say it).
    resets_at: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Relay:
    """An error event that is not a reason to retry: give it to the client as it is."""


Decision = RetrySame | RetryOther | FailStreamIncomplete | FailHttp | Relay


def backoff_delay(attempt: int, *, base: float, cap: float, jitter: float) -> float:
    """Delay before retry number `attempt` (0 for the first retry).

    Exponential, capped, with "equal jitter": half the step is fixed and half
    scales with `jitter`, a random value in [0, 1) chosen by the caller, so
    concurrent retries spread out but never fire at once.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if not 0.0 <= jitter < 1.0:
        raise ValueError("jitter must be in [0, 1)")
    step = min(cap, base * 2.0**attempt)
    return step / 2.0 + step / 2.0 * jitter


def fail_http_for(affinity: AffinityKind, failure: Failure) -> FailHttp:
    """The client's HTTP error when `failure` is the last word on a request."""
    message = describe(failure)
    upstream_status = failure.status if isinstance(failure, HandshakeRejected) else None
    if isinstance(failure, ConnectFailed) and is_refresh_failure(failure):
        return _refresh_failed(failure, message)
    if error_class(failure) is ErrorClass.OVERLOADED:
        # 503 with the upstream's own code: what Codex CLI shows as "servers overloaded".
        return FailHttp(503, "server_is_overloaded", message=message)
    if is_rate_limit(failure):
        code = failure.code if isinstance(failure, UpstreamErrorEvent) and failure.code else None
        return FailHttp(
            429,
            code or "rate_limit_exceeded",
            retry_after_of(failure),
            upstream_status,
            message,
        )
    if affinity is AffinityKind.HARD:
        return FailHttp(
            502,
            "owner_unavailable",
            upstream_status=upstream_status,
            message=f"the account that owns this session cannot serve it: {message}",
        )
    return FailHttp(502, "upstream_error", upstream_status=upstream_status, message=message)


def _refresh_failed(failure: ConnectFailed, message: str) -> FailHttp:
    if failure.detail == STATE_STORE_UNAVAILABLE:
        return FailHttp(503, STATE_STORE_UNAVAILABLE, failure.retry_after_s or 1.0, message=message)
    if failure.cause == REFRESH_REFUSED:
        return FailHttp(502, "token_refresh_failed", message=message)
    return FailHttp(503, "token_refresh_failed", failure.retry_after_s or 1.0, message=message)


def _moves_soft(failure: Failure) -> bool:
    """Whether a SOFT/NONE request leaves the failed account (see the module table)."""
    if isinstance(failure, HandshakeRejected) or is_refresh_failure(failure):
        return True
    if isinstance(failure, UpstreamErrorEvent):
        return failure.kind in RETRYABLE and not is_connection_limit(failure)
    return (
        isinstance(failure, UpstreamClosed)
        and failure.code == CloseCode.INTERNAL_ERROR
        and not failure.by_bridge
    )


def is_transient(failure: Failure) -> bool:
    """A failure that may well pass if the same account is tried again later.

    Not a refresh failure: the refresher's own backoff says when to try again, and a
    request starting over on the account would only meet it (or cost another refresh).
    """
    if is_refresh_failure(failure):
        return False
    if isinstance(failure, HandshakeRejected):
        return failure.status >= 500
    if isinstance(failure, UpstreamClosed):
        return failure.code == CloseCode.INTERNAL_ERROR
    if isinstance(failure, UpstreamErrorEvent):
        return failure.kind is ErrorClass.OVERLOADED
    return isinstance(failure, ConnectFailed | ConnectionLost | UpstreamSilent)


def wants_refresh(failure: Failure) -> bool:
    """A refusal of the account's access token that a refreshed token may cure.

    A handshake 401, or an `invalid_api_key` / `authentication_error` event;
    never a permanent code (`token_expired`, the refresh codes).
    """
    if isinstance(failure, HandshakeRejected):
        return failure.status == 401
    return error_class(failure) is ErrorClass.AUTH


def free_retry(
    failure: Failure,
    *,
    reused: bool,
    client_has_seen_event: bool,
    token_refreshed: bool,
    prewarm_after_created: bool = False,
) -> str | None:
    """Why this failure earns a retry on the same account at no cost (None: it does not).

    `token_refreshed`: the account's access token was refreshed after this
    failure (a handshake 401 or an auth error event), so the retry carries a
    new credential. `prewarm_after_created`: a prewarm failed after its
    `response.created`, which the client was never sent.
    """
    if client_has_seen_event:
        return None
    if is_connection_limit(failure):
        return "connection_limit"
    if reused and isinstance(failure, UpstreamClosed | ConnectionLost):
        return "dead_reused_socket"
    if is_handoff(failure):
        return "handoff"
    if token_refreshed and wants_refresh(failure):
        return "token_refreshed"
    if prewarm_after_created and not isinstance(failure, UpstreamErrorEvent):
        return "prewarm_resend"
    return None


def _owner_cannot_serve(failure: Failure) -> bool:
    """HARD failures that retrying the owner cannot fix: auth, rate limit, no WebSocket there."""
    if isinstance(failure, UpstreamErrorEvent):
        return failure.kind in AUTH_CLASSES or failure.is_rate_limit
    return isinstance(failure, HandshakeRejected) and (
        failure.status in (401, 403, 404, 426) or is_rate_limit(failure)
    )


def _final(failure: Failure, client_has_seen_event: bool) -> Decision | None:
    """The rows that end a request whatever its affinity and budget (None: the table decides)."""
    if isinstance(failure, InvalidUpstreamEvent):
        # Another try is no fix for an upstream that speaks garbage, and it is no account's fault.
        if client_has_seen_event:
            return FailStreamIncomplete(None, describe(failure))
        return FailHttp(502, "invalid_upstream_event", message=describe(failure))
    if isinstance(failure, UpstreamErrorEvent) and (
        client_has_seen_event or failure.kind not in RETRYABLE
    ):
        return Relay()
    if client_has_seen_event:
        return FailStreamIncomplete(close_code_seen(failure), describe(failure))
    if is_client_rejection(failure):
        # The request itself was refused (its size, its headers): answered once, as the
        # upstream said, on whichever account.
        assert isinstance(failure, HandshakeRejected)
        return FailHttp(
            failure.status,
            "upstream_rejected",
            upstream_status=failure.status,
            message=describe(failure),
        )
    if isinstance(failure, UpstreamSilent) and failure.first_event:
        return FailHttp(504, "upstream_timeout", message=describe(failure))
    return None


def decide(
    *,
    affinity: AffinityKind,
    failure: Failure,
    client_has_seen_event: bool,
    attempts_made: int,
    retry_budget: int = DEFAULT_RETRY_BUDGET,
    account_id: str,
    owner_usable: bool,
    backoff_base_s: float = 0.25,
    backoff_cap_s: float = 2.0,
    jitter: float = 0.0,
) -> Decision:
    """The next step after an attempt on `account_id` failed with `failure`.

    `attempts_made` counts attempts so far, the failed one included (>= 1); up
    to `retry_budget` retries follow the first attempt. `owner_usable` says
    whether the pool still finds `account_id` usable after recording this
    failure (for HARD, `account_id` is the owner).
    """
    if attempts_made < 1:
        raise ValueError("attempts_made must be >= 1")
    final = _final(failure, client_has_seen_event)
    if final is not None:
        return final

    retries_used = attempts_made - 1
    budget_left = retries_used < retry_budget
    if is_connection_limit(failure):
        # Not the account's fault, whatever the affinity: a new socket on it.
        if budget_left:
            return RetrySame(account_id, 0.0)
        return fail_http_for(affinity, failure)
    if affinity is AffinityKind.HARD:
        # A 1011 from the owner is just another close. The owner keeps
        # the request; no other account is ever chosen.
        if _owner_cannot_serve(failure) or is_refresh_failure(failure):
            return fail_http_for(affinity, failure)
        if budget_left and owner_usable:
            delay = backoff_delay(
                retries_used, base=backoff_base_s, cap=backoff_cap_s, jitter=jitter
            )
            return RetrySame(account_id, delay)
        return fail_http_for(affinity, failure)

    if not budget_left:
        return fail_http_for(affinity, failure)
    if _moves_soft(failure) or not owner_usable:
        return RetryOther(account_id)
    delay = backoff_delay(retries_used, base=backoff_base_s, cap=backoff_cap_s, jitter=jitter)
    return RetrySame(account_id, delay)
