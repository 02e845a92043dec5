"""Which upstream handshakes a pre-opened ("warm spare") socket can stand in for.

A spare is opened before the request it will serve exists, so it cannot carry
that request's own headers. It is opened with the *account-level* part of a
handshake: everything `handshake_headers` would send except what names one
request, turn or conversation. A request may take a spare exactly when its own
handshake, without those headers, is the spare's: same credential, same beta
token, same client identity (user agent, originator, version, feature flags).

The trade-off: a socket that came from a spare never showed the upstream the
request's session, thread or request ids in its handshake; they still reach it
in the `response.create` body (`prompt_cache_key`, `client_metadata`). A
request carrying `x-codex-turn-state` never takes a spare: that token is issued
by the server to route the turn's next socket and must be in its handshake.
"""

from __future__ import annotations

from collections.abc import Sequence

# Name one request, turn or conversation: never sent on a spare's handshake.
PER_REQUEST = frozenset(
    {
        "x-request-id",
        "x-client-request-id",
        "session_id",
        "session-id",
        "thread-id",
        "conversation_id",
        "x-codex-session-id",
        "x-codex-conversation-id",
        "x-codex-turn-metadata",
        "x-codex-window-id",
    }
)
# Must reach the upstream on the very socket that serves the request.
NEEDS_OWN_HANDSHAKE = frozenset({"x-codex-turn-state"})

SpareHeaders = tuple[tuple[str, str], ...]


def spare_headers(handshake: Sequence[tuple[str, str]]) -> SpareHeaders | None:
    """The handshake a spare for this request would be opened with (None: no spare fits).

    `handshake` is what `upstream_handshake_headers` returned for the request;
    order and case are kept, so equal results mean identical spare handshakes.
    """
    if any(name.lower() in NEEDS_OWN_HANDSHAKE for name, _ in handshake):
        return None
    return tuple((name, value) for name, value in handshake if name.lower() not in PER_REQUEST)
