"""How an upstream attempt fails: one vocabulary from the socket to the HTTP answer.

The `websockets` client layer turns what happened into one of these values and
raises it inside `AttemptFailed`; the retry policy judges the same value, the
account pool counts it, and `openai_errors.for_failure` turns it into the
client's answer. Nothing re-describes a failure on the way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from websockets.frames import CloseCode

from responses_ws_bridge.core import http_fields
from responses_ws_bridge.core.error_classes import (
    AUTH_CLASSES,
    CONNECTION_LIMIT_CODE,
    RATE_LIMIT_CODES,
    USAGE_LIMIT_CODE,
    ErrorClass,
    classify,
)

__all__ = ["CONNECTION_LIMIT_CODE", "RATE_LIMIT_CODES"]
PREVIOUS_RESPONSE_NOT_FOUND = "previous_response_not_found"

# Why no WebSocket could be opened (`ConnectFailed.cause`), as the attempt's outcome says it.
CONNECT_FAILED = "connect_failed"
# The upstream URL is unusable (malformed, or this proxy itself).
BAD_URL = "bad_url"
# The account's access token could not be refreshed: not now (the endpoint down, slow or
# garbled, a backoff running, no lock to refresh under), or never (the endpoint refused the
# login for good).
REFRESH_FAILED = "refresh_failed"
REFRESH_REFUSED = "refresh_refused"
# A refresh needs the shared store's lock, and the store is unavailable.
STATE_STORE_UNAVAILABLE = "state_store_unavailable"


@dataclass(frozen=True)
class UpstreamClosed:
    """The WebSocket ended with a close frame (1005: a frame without a status code).

    `by_bridge` is True when the bridge's own client sent the close first (for
    example its keepalive gave up and sent 1011): then the code is the bridge's
    verdict on the connection, not the upstream's.
    """

    code: int
    reason: str = ""
    by_bridge: bool = False


@dataclass(frozen=True)
class ConnectionLost:
    """The connection dropped without a close frame (a WebSocket client reports 1006)."""

    detail: str = ""


@dataclass(frozen=True)
class HandshakeRejected:
    """The upstream answered the upgrade with a plain HTTP status."""

    status: int
    headers: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    body: bytes = field(default=b"", compare=False)
    # Seconds until a rate-limited account may be used again, when it said.
    retry_after_s: float | None = None

    def header(self, name: str) -> str | None:
        return http_fields.header(self.headers, name)


@dataclass(frozen=True)
class ConnectFailed:
    """No WebSocket could be opened: refused, unreachable, TLS failure, timeout, bad answer."""

    detail: str = ""
    timed_out: bool = False
    cause: str = CONNECT_FAILED
    # When a refresh may be tried again (a refresh failure's backoff).
    retry_after_s: float | None = None


def refresh_failure(reason: str, *, permanent: bool, retry_after_s: float | None) -> ConnectFailed:
    """No token to open the socket with: `reason` is the refresher's code (never a secret)."""
    cause = REFRESH_REFUSED if permanent else REFRESH_FAILED
    return ConnectFailed(reason, cause=cause, retry_after_s=retry_after_s)


def is_refresh_failure(failure: Failure) -> bool:
    return isinstance(failure, ConnectFailed) and failure.cause in (REFRESH_FAILED, REFRESH_REFUSED)


@dataclass(frozen=True)
class UpstreamErrorEvent:
    """An in-band `error` event from the upstream, WebSocket (nested) or flat shape."""

    code: str | None
    status: int | None = None
    type: str | None = None
    message: str = "the upstream reported an error"
    param: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    # The upstream's error object as sent, so that a client gets all of it.
    error_object: Mapping[str, Any] = field(default_factory=dict, hash=False)
    retry_after_s: float | None = None
    # It came as a `response.failed` (after `response.created`), not as an `error` event.
    failed_response: bool = field(default=False, compare=False)

    @property
    def kind(self) -> ErrorClass:
        return classify(self.code, self.type, self.message)

    @property
    def is_rate_limit(self) -> bool:
        return self.kind is ErrorClass.RATE_LIMIT


@dataclass(frozen=True)
class UpstreamSilent:
    """The socket stayed open but the upstream sent no frame for `idle_s` seconds.

    Like a lost connection it says nothing against the account; unlike one,
    the bridge gave up on it (`bridge_stream_idle_timeout`). `first_event`:
    the request's own deadline for its first event ran out
    (`bridge_first_event_timeout`, counted over every attempt): nothing is tried again.
    """

    idle_s: float
    first_event: bool = False


@dataclass(frozen=True)
class InvalidUpstreamEvent:
    """The upstream sent a frame no client could read back as the event it is.

    A binary frame, text that is not a JSON object of finite numbers, or a
    `type` with a line break; `reason` says which (never the frame itself).
    """

    reason: str


Failure = (
    UpstreamClosed
    | ConnectionLost
    | HandshakeRejected
    | ConnectFailed
    | UpstreamErrorEvent
    | UpstreamSilent
    | InvalidUpstreamEvent
)


class AttemptFailed(Exception):
    """Raised by the I/O layer when an attempt ends in `failure`."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(describe(failure))
        self.failure = failure


def close_code_seen(failure: Failure) -> int | None:
    """The close code a WebSocket client would report for `failure`, if it ended a socket."""
    if isinstance(failure, UpstreamClosed):
        return failure.code
    if isinstance(failure, ConnectionLost):
        return CloseCode.ABNORMAL_CLOSURE
    return None


def idle_timeout_of(failure: Failure) -> float | None:
    """The idle timeout that ended the attempt, when the upstream went silent."""
    return failure.idle_s if isinstance(failure, UpstreamSilent) else None


def is_rate_limit(failure: Failure) -> bool:
    """A 429 handshake or an error event whose code says the account is out of quota."""
    if isinstance(failure, HandshakeRejected):
        return failure.status == 429
    if isinstance(failure, UpstreamErrorEvent):
        return failure.is_rate_limit
    return False


def is_usage_limit(failure: Failure) -> bool:
    """A plan's usage limit (`usage_limit_reached`), not a short throttle: it lasts until
    the window resets, so a pool out on it tells the client so (`account_pool`)."""
    if isinstance(failure, UpstreamErrorEvent):
        return USAGE_LIMIT_CODE in (failure.code, failure.type)
    if not isinstance(failure, HandshakeRejected) or failure.status != 429:
        return False
    try:
        body = json.loads(failure.body) if failure.body else None
    except (ValueError, RecursionError):
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and USAGE_LIMIT_CODE in (error.get("code"), error.get("type"))


def is_connection_limit(failure: Failure) -> bool:
    """The socket is too old to take another `response.create`: not the account's fault."""
    return isinstance(failure, UpstreamErrorEvent) and failure.kind is ErrorClass.CONNECTION_LIMIT


def error_class(failure: Failure) -> ErrorClass | None:
    """The class of an upstream error event (`error_classes`); None for other failures."""
    return failure.kind if isinstance(failure, UpstreamErrorEvent) else None


def is_auth_error_event(failure: Failure) -> bool:
    """An in-stream `invalid_api_key` / `authentication_error` (or a permanent auth code)."""
    return error_class(failure) in AUTH_CLASSES


def is_handoff(failure: Failure) -> bool:
    """A clean close 1000 (before any event): the upstream handing the session over."""
    return (
        isinstance(failure, UpstreamClosed)
        and failure.code == CloseCode.NORMAL_CLOSURE
        and not failure.by_bridge
    )


def is_lost_connection(failure: Failure) -> bool:
    """No close frame (1006), a silent upstream, or the bridge's own client gave up (keepalive)."""
    return isinstance(failure, ConnectionLost | UpstreamSilent) or (
        isinstance(failure, UpstreamClosed) and failure.by_bridge
    )


def is_account_neutral(failure: Failure) -> bool:
    """Failures that say nothing about the account: no strike, no cooldown.

    An overloaded model, content only another account can read, a request the
    upstream refused for its size: none is the account's doing.
    """
    return (
        is_lost_connection(failure)
        or is_handoff(failure)
        or is_connection_limit(failure)
        or error_class(failure) in (ErrorClass.OVERLOADED, ErrorClass.ACCOUNT_BOUND)
        or is_client_rejection(failure)
    )


def is_auth_rejection(failure: Failure) -> bool:
    """A handshake 401/403, or an auth error event: the account's credential is refused."""
    if isinstance(failure, HandshakeRejected):
        return failure.status in (401, 403)
    return is_auth_error_event(failure)


# Handshake statuses that refuse the request itself (its size, its headers), not the account.
CLIENT_REJECTION_STATUSES = frozenset({400, 413, 414, 431})


def is_client_rejection(failure: Failure) -> bool:
    """The upstream refused the request for what it is: no retry helps, no account is at fault."""
    return isinstance(failure, HandshakeRejected) and failure.status in CLIENT_REJECTION_STATUSES


def is_upstream_fault(failure: Failure) -> bool:
    """A failure that counts against the account's health: handshake 5xx or close 1011."""
    if isinstance(failure, HandshakeRejected):
        return failure.status >= 500
    return (
        isinstance(failure, UpstreamClosed)
        and failure.code == CloseCode.INTERNAL_ERROR
        and not failure.by_bridge
    )


def retry_after_of(failure: Failure) -> float | None:
    if isinstance(failure, HandshakeRejected | UpstreamErrorEvent | ConnectFailed):
        return failure.retry_after_s
    return None


def describe(failure: Failure) -> str:
    """A short, secret-free description for error messages, logs and flow metadata."""
    match failure:
        case UpstreamClosed(code=CloseCode.NO_STATUS_RCVD):
            return "upstream closed the WebSocket without a status code"
        case UpstreamClosed(code=code, by_bridge=True):
            return f"the bridge closed the upstream WebSocket with code {code} (connection lost)"
        case UpstreamClosed(code=code):
            return f"upstream closed the WebSocket with code {code}"
        case ConnectionLost():
            return "upstream connection lost without a close frame"
        case HandshakeRejected(status=status):
            return f"upstream rejected the WebSocket handshake with HTTP {status}"
        case ConnectFailed(cause=cause, detail=reason) if cause in (
            REFRESH_FAILED,
            REFRESH_REFUSED,
        ):
            return f"the account's access token could not be refreshed ({reason})"
        case ConnectFailed(timed_out=True):
            return "upstream connection timed out"
        case ConnectFailed():
            return "could not connect to the upstream"
        case UpstreamErrorEvent(code=code):
            return f"upstream error event {code or 'without a code'}"
        case UpstreamSilent(idle_s=idle_s, first_event=True):
            return (
                f"no upstream event within {idle_s:g} s of the request (bridge_first_event_timeout)"
            )
        case UpstreamSilent(idle_s=idle_s):
            return f"no upstream event for {idle_s:g} s (bridge_stream_idle_timeout)"
        case InvalidUpstreamEvent(reason=reason):
            return f"the upstream sent an event that cannot be relayed ({reason})"


def outcome(failure: Failure) -> str:
    """The attempt's outcome word in the client flow's metadata."""
    match failure:
        case UpstreamClosed(by_bridge=True) | ConnectionLost():
            return "connection_lost"
        case UpstreamClosed():
            return "closed"
        case HandshakeRejected():
            return "rejected"
        case ConnectFailed(cause=cause):
            return cause
        case UpstreamErrorEvent(code=code):
            return f"error_event:{code}"
        case UpstreamSilent(first_event=True):
            return "first_event_timeout"
        case UpstreamSilent():
            return "upstream_silent"
        case InvalidUpstreamEvent():
            return "invalid_event"


def detail(failure: Failure) -> str:
    """What the attempt list shows beside the outcome."""
    match failure:
        case HandshakeRejected(status=status):
            return f"HTTP {status}"
        case ConnectFailed(detail=text) | ConnectionLost(detail=text):
            return text
        case UpstreamClosed(reason=reason, by_bridge=by_bridge):
            return reason + (" (closed by the bridge: connection lost)" if by_bridge else "")
        case UpstreamErrorEvent() | InvalidUpstreamEvent():
            return ""
        case UpstreamSilent(idle_s=idle_s):
            return f"no event for {idle_s:g} s"
