"""Where an attempt goes: the upstream URL for an account, checked once for every engine.

The turn engine, the forwarded-request engine and the WebSocket-client engine
all ask this before they open anything.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from responses_ws_bridge.core import upstream_trust
from responses_ws_bridge.core.accounts import Account
from responses_ws_bridge.core.failures import BAD_URL, ConnectFailed
from responses_ws_bridge.core.turns import Destination


def attempt_url(
    build: Callable[..., str],
    *,
    option: str,
    account: Account | None,
    destination: Destination,
    own_endpoints: tuple[upstream_trust.Endpoint, ...],
) -> str | ConnectFailed:
    """Where an attempt goes (`build`: `routing.upstream_url` or `routing.forward_url`), or
    why it cannot: a malformed URL, or one aimed at this proxy itself (an account's
    upstream, or `bridge_upstream`)."""
    try:
        url = build(
            option=option,
            account_upstream=account.upstream if account is not None else None,
            scheme=destination.scheme,
            host=destination.host,
            port=destination.port,
            path=destination.path,
        )
    except ValueError as exc:
        return ConnectFailed(str(exc), cause=BAD_URL)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    if upstream_trust.is_own_endpoint(parts.hostname or "", port, own_endpoints):
        return ConnectFailed("the upstream is this proxy itself", cause=BAD_URL)
    return url
