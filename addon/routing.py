"""Which requests are bridged, and which upstream WebSocket URL they go to."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

_WS_SCHEME = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_DEFAULT_PORT = {"ws": 80, "wss": 443}


def is_bridged(method: str, path: str) -> bool:
    """POST to a path that ends in /responses (query aside)."""
    if method != "POST":
        return False
    return path.split("?", 1)[0].endswith("/responses")


def validate_upstream_option(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme.lower() not in _WS_SCHEME or not parts.hostname:
        raise ValueError(f"{value!r} is not a ws://, wss://, http:// or https:// URL with a host")


def upstream_url(
    *, option: str, account_upstream: str | None, scheme: str, host: str, port: int, path: str
) -> str:
    configured = option or account_upstream
    if configured:
        validate_upstream_option(configured)
        parts = urlsplit(configured)
        ws_scheme = _WS_SCHEME[parts.scheme.lower()]
        if parts.path in ("", "/"):
            # A bare host: the request's own path goes to it.
            request = urlsplit(path)
            return urlunsplit((ws_scheme, parts.netloc, request.path, request.query, ""))
        return urlunsplit((ws_scheme, parts.netloc, parts.path, parts.query, ""))
    mapped = _WS_SCHEME.get(scheme.lower())
    if mapped is None:
        raise ValueError(f"cannot map scheme {scheme!r} to a WebSocket URL")
    ws_scheme = mapped
    netloc = f"[{host}]" if ":" in host else host
    if port != _DEFAULT_PORT[ws_scheme]:
        netloc += f":{port}"
    return f"{ws_scheme}://{netloc}{path}"
