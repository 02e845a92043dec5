"""OpenAI-style HTTP error answers: `{"error": {"message", "type", "code", "param"}}`.

One constructor per way a bridged request can fail before the client has seen
an event. Messages name what failed, never a credential: text that
comes from elsewhere (upstream bodies, exception details) is passed through
`redact_secrets`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from responses_ws_bridge.core import http_fields
from responses_ws_bridge.core.error_classes import USAGE_LIMIT_CODE
from responses_ws_bridge.core.failures import (
    ConnectFailed,
    ConnectionLost,
    Failure,
    HandshakeRejected,
    InvalidUpstreamEvent,
    UpstreamClosed,
    UpstreamErrorEvent,
    UpstreamSilent,
    describe,
)
from responses_ws_bridge.core.handshake_headers import redact_secrets
from responses_ws_bridge.core.rate_limits import from_headers, to_headers
from responses_ws_bridge.core.upstream_events import DEFAULT_RETRY_AFTER_S, retry_after_header

if TYPE_CHECKING:
    from responses_ws_bridge.core.body_decoding import BodyDecodingError
    from responses_ws_bridge.core.create_request import BadRequest
    from responses_ws_bridge.core.retry_policy import FailHttp

_JSON = ("content-type", "application/json")


def error_body(message: str, *, type_: str, code: str | None, param: str | None = None) -> bytes:
    error = {"message": message, "type": type_, "code": code, "param": param}
    return json.dumps({"error": error}).encode()


@dataclass(frozen=True)
class HttpError:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Every body here is JSON; say so even when the caller forgot.
        if not http_fields.has(self.headers, "content-type"):
            object.__setattr__(self, "headers", (_JSON, *self.headers))


def _error(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None,
    param: str | None = None,
    retry_after: str | None = None,
) -> HttpError:
    extra = (("retry-after", retry_after),) if retry_after else ()
    body = error_body(message, type_=type_, code=code, param=param)
    return HttpError(status, body, (_JSON, *extra))


def bad_request(exc: BadRequest) -> HttpError:
    """A body the bridge refused (400, or 413 when too large)."""
    return _error(
        exc.status, exc.message, type_="invalid_request_error", code=exc.code, param=exc.param
    )


def request_too_large(length: int | None, limit: int) -> HttpError:
    """413 from the announced Content-Length (None: the body itself was too large)."""
    size = f"{length} bytes" if length is not None else "too large"
    return _error(
        413,
        f"request body is {size}; the bridge accepts at most {limit} bytes",
        type_="invalid_request_error",
        code="request_too_large",
    )


def bridge_not_ready() -> HttpError:
    return _error(
        503,
        "the bridge is starting; try again",
        type_="server_error",
        code="bridge_not_ready",
        retry_after="1",
    )


def bridge_internal_error() -> HttpError:
    """A bug in the bridge ended the turn before any event: say so, keep serving the rest."""
    return _error(
        502,
        "the bridge failed to serve this request",
        type_="server_error",
        code="bridge_internal_error",
    )


def unauthorized_client_key() -> HttpError:
    # Never echo what the client sent: it may be a real key sent to the wrong place.
    return _error(
        401,
        "missing or unknown client key: send Authorization: Bearer <one of the bridge's "
        "client keys>",
        type_="invalid_request_error",
        code="invalid_client_key",
    )


def _header(headers: Mapping[str, str] | Sequence[tuple[str, str]], name: str) -> str | None:
    value = http_fields.header(headers, name)
    return value.strip() if value is not None else None


def _upstream_json_error(body: bytes | None) -> bytes | None:
    """The upstream's body when it is an OpenAI-style error object, re-serialized."""
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(parsed, dict) and "error" in parsed:
        return redact_secrets(json.dumps(parsed)).encode()
    return None


# Handshake statuses whose answer is the client's: passed on with the upstream's body.
_KEPT_STATUSES = frozenset({400, 401, 403, 413, 414, 429, 431})


def upstream_rejected(
    status: int,
    body: bytes | None,
    headers: Mapping[str, str] | Sequence[tuple[str, str]],
    *,
    retry_after_s: float | None = None,
    wall_now: float | None = None,
) -> HttpError:
    """The upstream refused the WebSocket handshake with an HTTP status.

    401/403/429, and 400/413/414/431 (the request's own size or headers),
    are the client's business (credentials, permissions, limits, the
    request) and keep their status and JSON error body; anything else is the
    bridge's failure to reach a working upstream: 502. Of the upstream's
    headers only a 429's Retry-After, clamped (`retry_after_s`: the delay the
    policy read from the body, when the header is missing), and its
    rate-limit families are passed on.
    """
    if status in _KEPT_STATUSES:
        retry_after = (
            retry_after_header(
                _header(headers, "retry-after"),
                fallback_s=retry_after_s or DEFAULT_RETRY_AFTER_S,
                wall_now=wall_now,
            )
            if status == 429
            else None
        )
        extra: tuple[tuple[str, str], ...] = (("retry-after", retry_after),) if retry_after else ()
        if status == 429:
            extra += tuple(to_headers(from_headers(headers)))
        forwarded = _upstream_json_error(body)
        if forwarded is not None:
            return HttpError(status, forwarded, (_JSON, *extra))
        return _error(
            status,
            f"the upstream refused the WebSocket handshake with HTTP {status}",
            type_="rate_limit_error" if status == 429 else "invalid_request_error",
            code="upstream_rejected",
            retry_after=retry_after,
        )
    return _error(
        502,
        f"the upstream refused the WebSocket handshake with HTTP {status}",
        type_="upstream_error",
        code="upstream_handshake_rejected",
    )


def upstream_unreachable(detail: str) -> HttpError:
    return _error(
        502,
        f"could not reach the upstream: {redact_secrets(detail)}",
        type_="upstream_error",
        code="upstream_unreachable",
    )


def upstream_timeout(detail: str) -> HttpError:
    return _error(
        502,
        f"the upstream did not answer in time: {redact_secrets(detail)}",
        type_="upstream_error",
        code="upstream_timeout",
    )


def upstream_closed(close_code: int | None, reason: str) -> HttpError:
    what = f"close code {close_code}" if close_code is not None else "connection lost"
    if reason:
        what += f": {redact_secrets(reason)}"
    return _error(
        502,
        f"the upstream WebSocket closed before any event ({what})",
        type_="upstream_error",
        code="upstream_closed",
    )


def from_error_event(
    event: UpstreamErrorEvent,
    *,
    retry_after_s: float | None = None,
    wall_now: float | None = None,
    status: int | None = None,
) -> HttpError:
    """An upstream `error` event before any other event, as an HTTP error.

    A rate-limit event is a 429 with Retry-After even when it carries no
    status (the upstream's header, else `retry_after_s`, else a default),
    and with the rate-limit families of its `headers` map. `status`: the
    decision's own status (503 for an overload), else the event's.
    """
    if status is None:
        status = _event_status(event)
    error: dict[str, Any] = dict(event.error_object)
    error.setdefault("message", event.message)
    error.setdefault("code", event.code)
    error.setdefault("param", event.param)
    if not isinstance(error.get("type"), str):
        limited = event.is_rate_limit or status == 429
        error["type"] = event.type or ("rate_limit_error" if limited else "upstream_error")
    body = redact_secrets(json.dumps({"error": error})).encode()
    limited = status == 429 or event.is_rate_limit
    retry_after = retry_after_header(
        _header(event.headers, "retry-after"),
        fallback_s=(retry_after_s or DEFAULT_RETRY_AFTER_S) if limited else None,
        wall_now=wall_now,
    )
    extra = (("retry-after", retry_after),) if retry_after else ()
    return HttpError(status, body, (_JSON, *extra, *to_headers(from_headers(event.headers))))


def _event_status(event: UpstreamErrorEvent) -> int:
    if event.status is not None and 400 <= event.status < 600:
        return event.status
    return 429 if event.is_rate_limit else 502


_TYPE_FOR_STATUS = {429: "rate_limit_error", 502: "upstream_error", 503: "server_error"}


def decision_error(
    status: int, code: str, message: str, *, retry_after: str | None = None
) -> HttpError:
    """The error for a routing or retry decision of the account pool."""
    return _error(
        status,
        message,
        type_=_TYPE_FOR_STATUS.get(status, "upstream_error"),
        code=code,
        retry_after=retry_after,
    )


def all_accounts_cooling(retry_after_s: int) -> HttpError:
    return _error(
        429,
        "every upstream account is cooling down; retry after the Retry-After delay",
        type_="rate_limit_error",
        code="all_accounts_cooling_down",
        retry_after=retry_after_header(None, fallback_s=max(1, retry_after_s)),
    )


def owner_cooling(account_id: str, retry_after_s: float) -> HttpError:
    """A hard session's owner alone is cooling down (other accounts may be fine)."""
    return _error(
        429,
        f"this session is bound to account {account_id!r}, which is cooling down; "
        "retry after the Retry-After delay (it is never moved to another account)",
        type_="rate_limit_error",
        code="owner_cooling_down",
        retry_after=retry_after_header(None, fallback_s=max(1.0, retry_after_s)),
    )


def upstream_invalid_event(reason: str) -> HttpError:
    """The upstream sent an event the bridge cannot pass on (before any other event)."""
    return _error(
        502,
        f"the upstream sent an event that cannot be relayed ({redact_secrets(reason)})",
        type_="upstream_error",
        code="invalid_upstream_event",
    )


def no_account() -> HttpError:
    return _error(
        503,
        "no upstream account can serve this request",
        type_="server_error",
        code="no_account_available",
    )


def owner_unavailable(account_id: str, detail: str) -> HttpError:
    return _error(
        502,
        f"this session is bound to account {account_id!r}, which cannot serve it now "
        f"({redact_secrets(detail)}); it is never moved to another account",
        type_="upstream_error",
        code="owner_unavailable",
    )


# --- failures and decisions: the one place they become HTTP answers ---------------------------


def for_failure(failure: Failure, fail: FailHttp | None, *, passthrough: bool) -> HttpError:
    """The client's answer when `failure` ends a request before any event.

    Pass-through: the upstream's verdict on the client's own credential, as it
    was. Pool mode: `fail` (the decision) says status and code; an upstream
    429 keeps its own body. `fail` None: the failure is relayed as it is (an
    error event that is no reason to retry).
    """
    if passthrough or fail is None or isinstance(failure, InvalidUpstreamEvent):
        return _upstream_verdict(failure)
    if isinstance(failure, HandshakeRejected) and failure.status == fail.status:
        # The upstream's own answer (a 429, or the request refused for its size).
        return upstream_rejected(failure.status, failure.body, failure.headers)
    if isinstance(failure, UpstreamErrorEvent) and fail.status in (429, 503):
        return from_error_event(failure, status=fail.status)
    return for_decision(fail)


def for_decision(fail: FailHttp) -> HttpError:
    """A routing or retry decision's own status and code."""
    retry_after = retry_after_header(None, fallback_s=fail.retry_after_s)
    if fail.code == USAGE_LIMIT_CODE and fail.status == 429:
        return usage_limit_reached(fail.message or fail.code, retry_after, fail.resets_at)
    return decision_error(
        fail.status, fail.code, fail.message or fail.code, retry_after=retry_after
    )


def usage_limit_reached(
    message: str, retry_after: str | None, resets_at: float | None
) -> HttpError:
    """Every account (or a hard session's owner) is out on a usage limit.

    Shaped as the Codex backend answers it: `type` `usage_limit_reached` is
    what Codex CLI reads to show its usage message (with `resets_at`, epoch
    seconds) instead of retrying.
    """
    error: dict[str, Any] = {
        "message": message,
        "type": USAGE_LIMIT_CODE,
        "code": USAGE_LIMIT_CODE,
        "param": None,
    }
    if resets_at is not None:
        error["resets_at"] = math.ceil(resets_at)
    extra = (("retry-after", retry_after),) if retry_after else ()
    return HttpError(429, json.dumps({"error": error}).encode(), (_JSON, *extra))


def _upstream_verdict(failure: Failure) -> HttpError:
    match failure:
        case HandshakeRejected(status=status, body=body, headers=headers):
            return upstream_rejected(status, body, headers)
        case UpstreamErrorEvent():
            return from_error_event(failure)
        case UpstreamClosed(code=code, reason=reason):
            return upstream_closed(code, reason)
        case ConnectFailed(timed_out=True, detail=detail):
            return upstream_timeout(detail)
        case ConnectFailed(detail=detail):
            return upstream_unreachable(detail)
        case ConnectionLost():
            return upstream_closed(None, "")
        case UpstreamSilent():
            return upstream_timeout(describe(failure))
        case InvalidUpstreamEvent(reason=reason):
            return upstream_invalid_event(reason)


def state_store_unavailable() -> HttpError:
    """A hard-affinity request whose owner the shared state store could not tell."""
    return _error(
        503,
        "the shared state store is unavailable and this session's account is not known "
        "here; it is never moved to another account",
        type_="server_error",
        code="state_store_unavailable",
        retry_after="1",
    )


def untrusted_upstream(where: str, *, loop: bool = False, cleartext: bool = False) -> HttpError:
    """The destination may not receive an upstream turn; nothing was sent anywhere."""
    if loop:
        why = f"{where} is this proxy itself, which is never an upstream"
    elif cleartext:
        why = (
            f"{where} is not TLS: an account's credential is never sent in clear; "
            "use https, or set bridge_upstream"
        )
    else:
        why = (
            f"{where} is not a trusted upstream: with an account pool, account credentials "
            "go only to bridge_upstream, an account's upstream, or a host listed in "
            "bridge_trusted_upstreams"
        )
    return _error(403, why, type_="invalid_request_error", code="untrusted_upstream")


def headers_too_large(size: int, limit: int) -> HttpError:
    return _error(
        431,
        f"request headers are {size} bytes; the bridge accepts at most {limit} bytes",
        type_="invalid_request_error",
        code="request_headers_too_large",
    )


def invalid_header(name: str, why: str) -> HttpError:
    """A header the bridge cannot carry upstream. Its value is never echoed."""
    return _error(
        400,
        f"header {name}: {why}",
        type_="invalid_request_error",
        code="invalid_header",
        param=name.lower(),
    )


def body_decoding_failed(exc: BodyDecodingError) -> HttpError:
    """A Content-Encoding the bridge does not decode (415), a bomb (413), corrupt data (400)."""
    return _error(exc.status, exc.message, type_="invalid_request_error", code=exc.code)


def expectation_failed() -> HttpError:
    return _error(
        417,
        "only Expect: 100-continue is supported",
        type_="invalid_request_error",
        code="expectation_failed",
    )
