"""Which requests are bridged, and which upstream WebSocket URL they go to."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit, urlunsplit

_WS_SCHEME = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_DEFAULT_PORT = {"ws": 80, "wss": 443}


def is_bridged(method: str, path: str) -> bool:
    """POST to a path that ends in `/responses`, query aside.

    Methods are case-sensitive (RFC 9110 §9.1). `/v1/responses/` is not
    bridged: the API never uses the trailing slash, so it is left to pass
    through and fail or succeed as the origin decides.
    """
    if method != "POST":
        return False
    return path.split("?", 1)[0].endswith("/responses")


def _parse(value: str) -> SplitResult:
    parts = urlsplit(value.strip())
    if parts.scheme.lower() not in _WS_SCHEME:
        raise ValueError(
            f"{value!r}: the upstream must be a ws://, wss://, http:// or https:// URL "
            "(http and https are mapped to ws and wss)"
        )
    if not parts.hostname:
        raise ValueError(f"{value!r}: the upstream URL has no host")
    try:
        parts.port  # noqa: B018  (urlsplit checks the port only when asked)
    except ValueError as exc:
        raise ValueError(f"{value!r}: the upstream URL has an invalid port ({exc})") from exc
    return parts


def validate_upstream_option(value: str) -> None:
    """Raise ValueError with a message for the user when `value` is not a usable upstream."""
    _parse(value)


def upstream_url(
    *, option: str, account_upstream: str | None, scheme: str, host: str, port: int, path: str
) -> str:
    """The upstream WebSocket URL: the option, else the account's, else the flow's destination.

    `path` is the request's path with its query. A configured URL with no path
    (or just "/") gets the request's path, so `wss://api.openai.com` works.
    """
    configured = option.strip() or (account_upstream or "").strip()
    if configured:
        parts = _parse(configured)
        ws_scheme = _WS_SCHEME[parts.scheme.lower()]
        if parts.path in ("", "/"):
            request = urlsplit(path)
            return urlunsplit((ws_scheme, parts.netloc, request.path, request.query, ""))
        return urlunsplit((ws_scheme, parts.netloc, parts.path, parts.query, ""))
    ws_scheme = _WS_SCHEME.get(scheme.lower(), "")
    if not ws_scheme:
        raise ValueError(f"cannot map the request's scheme {scheme!r} to a WebSocket scheme")
    netloc = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if port != _DEFAULT_PORT[ws_scheme]:
        netloc += f":{port}"
    if not path.startswith("/"):
        path = "/" + path
    return f"{ws_scheme}://{netloc}{path}"


_HTTP_SCHEME = {"ws": "http", "wss": "https"}


def forward_url(
    *, option: str, account_upstream: str | None, scheme: str, host: str, port: int, path: str
) -> str:
    """Where a request the pool forwards over HTTP goes: the origin a bridged request of
    the same account would use (`upstream_url`), with the request's own path and query.

    A configured upstream names a WebSocket endpoint (`…/responses`); the other
    endpoints of the API live beside it on the same origin, so only its scheme,
    host and port are taken.
    """
    ws_url = upstream_url(
        option=option,
        account_upstream=account_upstream,
        scheme=scheme,
        host=host,
        port=port,
        path=path,
    )
    parts = urlsplit(ws_url)
    request = urlsplit(path if path.startswith("/") else "/" + path)
    http_scheme = _HTTP_SCHEME[parts.scheme]
    return urlunsplit((http_scheme, parts.netloc, request.path, request.query, ""))
