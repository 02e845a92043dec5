"""OpenAI-style error responses: `{"error": {"message", "type", "code", "param"}}`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from addon.create_request import BadRequest
    from addon.upstream_events import UpstreamErrorEvent

_JSON = ("content-type", "application/json")


def error_body(message: str, *, type_: str, code: str | None, param: str | None = None) -> bytes:
    error = {"message": message, "type": type_, "code": code, "param": param}
    return json.dumps({"error": error}).encode()


@dataclass(frozen=True)
class HttpError:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = (_JSON,)


def _error(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None,
    param: str | None = None,
    retry_after: str | None = None,
) -> HttpError:
    headers: tuple[tuple[str, str], ...] = (_JSON,)
    if retry_after is not None:
        headers += (("retry-after", retry_after),)
    return HttpError(status, error_body(message, type_=type_, code=code, param=param), headers)


def bad_request(exc: BadRequest) -> HttpError:
    return _error(
        exc.status, exc.message, type_="invalid_request_error", code=exc.code, param=exc.param
    )


def request_too_large(length: int | None, limit: int) -> HttpError:
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


def unauthorized_client_key() -> HttpError:
    return _error(
        401,
        "missing or unknown client key: send Authorization: Bearer <one of the bridge's "
        "client keys>",
        type_="invalid_request_error",
        code="invalid_client_key",
    )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name), None)


def upstream_rejected(status: int, body: bytes | None, headers: Mapping[str, str]) -> HttpError:
    retry_after = _header(headers, "retry-after") if status == 429 else None
    if status in (401, 403, 429):
        upstream_error = _json_error(body)
        if upstream_error is not None:
            extra = (("retry-after", retry_after),) if retry_after else ()
            return HttpError(status, upstream_error, (_JSON, *extra))
        return _error(
            status,
            f"the upstream refused the WebSocket handshake with HTTP {status}",
            type_="invalid_request_error" if status != 429 else "rate_limit_error",
            code="upstream_rejected",
            retry_after=retry_after,
        )
    return _error(
        502,
        f"the upstream refused the WebSocket handshake with HTTP {status}",
        type_="upstream_error",
        code="upstream_handshake_rejected",
    )


def _json_error(body: bytes | None) -> bytes | None:
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return json.dumps(parsed).encode()
    return None


def upstream_unreachable(detail: str) -> HttpError:
    return _error(
        502,
        f"could not reach the upstream: {detail}",
        type_="upstream_error",
        code="upstream_unreachable",
    )


def upstream_timeout(detail: str) -> HttpError:
    return _error(
        502,
        f"the upstream did not answer in time: {detail}",
        type_="upstream_error",
        code="upstream_timeout",
    )


def upstream_closed(close_code: int | None, reason: str) -> HttpError:
    what = f"close code {close_code}" if close_code is not None else "connection lost"
    if reason:
        what += f": {reason}"
    return _error(
        502,
        f"the upstream WebSocket closed before any event ({what})",
        type_="upstream_error",
        code="upstream_closed",
    )


def from_error_event(event: UpstreamErrorEvent) -> HttpError:
    status = event.status if event.status is not None and 400 <= event.status < 600 else 502
    retry_after = next((v for k, v in event.headers.items() if k.lower() == "retry-after"), None)
    return _error(
        status,
        event.message,
        type_=event.type or "upstream_error",
        code=event.code,
        param=event.param,
        retry_after=retry_after,
    )


def all_accounts_cooling(retry_after_s: int) -> HttpError:
    return _error(
        429,
        "every upstream account is cooling down",
        type_="rate_limit_error",
        code="all_accounts_cooling_down",
        retry_after=str(max(1, retry_after_s)),
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
        f"({detail}); it is never moved to another account",
        type_="upstream_error",
        code="owner_unavailable",
    )
