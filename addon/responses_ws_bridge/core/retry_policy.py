"""What to do after a failed upstream attempt: the reconnect decision table (BRIEF §3.5).

A failed attempt is a plain `Failure` value; `decide()` maps it, the request's
affinity, whether the client has seen an event, and the attempt count to one
`Decision`. Everything here is pure and deterministic: jitter and wall-clock
time are arguments.

The table, while the client has seen no event and retries remain:

| failure                                     | HARD                        | SOFT / NONE |
|---------------------------------------------|-----------------------------|-------------|
| close 1011                                  | RetrySame(owner)            | RetryOther  |
| close 1000/1001/1005/1006/1012/1013/...,    | RetrySame(owner)            | RetrySame   |
| connection lost, connect error              |                             |             |
| handshake 5xx (or another unlisted status)  | RetrySame(owner)            | RetryOther  |
| handshake 401/403                           | FailHttp 502 owner_unavail. | RetryOther  |
| handshake 404/426 (no WebSocket there)      | FailHttp 502 owner_unavail. | RetryOther  |
| handshake 429, rate-limit error event       | FailHttp 429 (passed on)    | RetryOther  |
| any other error event (e.g. 400)            | Relay                       | Relay       |

HARD never leaves the owner: when the owner cannot serve (disabled, cooling,
not a WebSocket endpoint) or the budget is spent, the request fails. SOFT/NONE
retry the same account after closes that say nothing against the account
(1000, 1001, 1005, 1006, 1012, 1013, connection lost, connect error): the
account is fine, and staying keeps a soft key's prompt cache warm; if the pool
no longer finds that account usable (`owner_usable` False) they move instead.
Budget spent: a rate-limit failure passes its 429 on, anything else is 502.
Once the client has seen an event nothing is replayed: an error event is
relayed as the terminal event it is, any other failure ends the stream with
`response.failed` / `stream_incomplete`.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from responses_ws_bridge.core.affinity import AffinityKind

CLOSE_INTERNAL_ERROR = 1011
RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded", "usage_limit_reached", "insufficient_quota"})
DEFAULT_RETRY_BUDGET = 2


# --- failures -------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamClose:
    """The upstream closed the WebSocket with a close frame (code None: no status, 1005)."""

    code: int | None
    reason: str = ""


@dataclass(frozen=True)
class ConnectionLost:
    """The connection dropped without a close frame (seen by clients as 1006)."""

    detail: str = ""


@dataclass(frozen=True)
class HandshakeStatus:
    """The upstream answered the upgrade with a plain HTTP status."""

    status: int
    retry_after_s: float | None = None


@dataclass(frozen=True)
class ConnectError:
    """No connection: refused, unreachable, TLS failure, or timeout."""

    detail: str = ""
    timed_out: bool = False


@dataclass(frozen=True)
class ErrorEvent:
    """An in-band `error` event from the upstream."""

    code: str | None
    status: int | None = None
    retry_after_s: float | None = None


Failure = UpstreamClose | ConnectionLost | HandshakeStatus | ConnectError | ErrorEvent


def is_rate_limit(failure: Failure) -> bool:
    """A 429 handshake or an error event whose code says the account is out of quota."""
    if isinstance(failure, HandshakeStatus):
        return failure.status == 429
    if isinstance(failure, ErrorEvent):
        return failure.code in RATE_LIMIT_CODES
    return False


def is_auth_rejection(failure: Failure) -> bool:
    return isinstance(failure, HandshakeStatus) and failure.status in (401, 403)


def is_upstream_fault(failure: Failure) -> bool:
    """A failure that counts against the account's health: handshake 5xx or close 1011."""
    if isinstance(failure, HandshakeStatus):
        return failure.status >= 500
    return isinstance(failure, UpstreamClose) and failure.code == CLOSE_INTERNAL_ERROR


def describe(failure: Failure) -> str:
    """A short, secret-free description for error messages and flow metadata."""
    match failure:
        case UpstreamClose(code=None):
            return "upstream closed the WebSocket without a status code"
        case UpstreamClose(code=code, reason=reason):
            return f"upstream closed the WebSocket with code {code}" + (
                f" ({reason})" if reason else ""
            )
        case ConnectionLost():
            return "upstream connection lost without a close frame"
        case HandshakeStatus(status=status):
            return f"upstream rejected the WebSocket handshake with HTTP {status}"
        case ConnectError(timed_out=True):
            return "upstream connection timed out"
        case ConnectError():
            return "could not connect to the upstream"
        case ErrorEvent(code=code):
            return f"upstream error event {code or 'without a code'}"


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


def handshake_failure(
    status: int,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    body: bytes | str | None,
    *,
    wall_now: float,
) -> HandshakeStatus:
    """The `Failure` for a rejected upgrade, with any reset time the upstream gave."""
    delay = retry_after_from(headers, body, wall_now=wall_now) if status == 429 else None
    return HandshakeStatus(status, delay)


def error_event_failure(event: Mapping[str, Any], *, wall_now: float) -> ErrorEvent:
    """The `Failure` for an upstream `error` event, WebSocket or SSE shape."""
    error = event.get("error")
    scope: Mapping[str, Any] = error if isinstance(error, Mapping) else event
    code = scope.get("code")
    status = event.get("status")
    failure = ErrorEvent(
        code if isinstance(code, str) else None,
        status if isinstance(status, int) and not isinstance(status, bool) else None,
    )
    if is_rate_limit(failure):
        raw_headers = event.get("headers")
        headers = raw_headers if isinstance(raw_headers, Mapping) else None
        delay = retry_after_from(headers, event, wall_now=wall_now)
        failure = ErrorEvent(failure.code, failure.status, delay)
    return failure


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
    upstream_status = failure.status if isinstance(failure, HandshakeStatus) else None
    if is_rate_limit(failure):
        code = failure.code if isinstance(failure, ErrorEvent) and failure.code else None
        return FailHttp(
            429,
            code or "rate_limit_exceeded",
            failure.retry_after_s if isinstance(failure, HandshakeStatus | ErrorEvent) else None,
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


def _moves_soft(failure: Failure) -> bool:
    """Whether a SOFT/NONE request leaves the failed account (see the module table)."""
    if isinstance(failure, HandshakeStatus):
        return True
    if isinstance(failure, ErrorEvent):
        return is_rate_limit(failure)
    return isinstance(failure, UpstreamClose) and failure.code == CLOSE_INTERNAL_ERROR


def _owner_cannot_serve(failure: Failure) -> bool:
    """HARD failures that retrying the owner cannot fix: auth, rate limit, no WebSocket there."""
    return isinstance(failure, HandshakeStatus) and (
        failure.status in (401, 403, 404, 426) or is_rate_limit(failure)
    )


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
    if isinstance(failure, ErrorEvent) and (client_has_seen_event or not is_rate_limit(failure)):
        return Relay()
    if client_has_seen_event:
        code = failure.code if isinstance(failure, UpstreamClose) else None
        if isinstance(failure, ConnectionLost):
            code = 1006  # what a WebSocket client reports for a drop without a close frame
        return FailStreamIncomplete(code, describe(failure))

    retries_used = attempts_made - 1
    budget_left = retries_used < retry_budget
    if affinity is AffinityKind.HARD:
        # The seed bug: a 1011 from the owner is just another close. The owner keeps
        # the request; no other account is ever chosen.
        if is_rate_limit(failure) or _owner_cannot_serve(failure):
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
