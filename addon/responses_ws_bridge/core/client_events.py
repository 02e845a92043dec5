"""Which upstream events reach which client, and how a quiet stream is kept alive.

The Codex backend sends events of its own beside the public Responses
events: `codex.rate_limits`, `response.metadata`, `codex.response.metadata`,
`responsesapi.websocket_timing`. What a client may be sent depends on who it
is, which the request path says (`client_kind`): `…/codex/responses` is Codex
CLI's ChatGPT endpoint, whose client reads the vendor events it knows and
ignores the rest; anything else (`/v1/responses`) is the public API, whose
event stream (the `openai` SDKs' contract) carries none of them.

| event type                                   | public (`/v1/…`)     | codex (`…/codex/…`)  |
|----------------------------------------------|----------------------|----------------------|
| `codex.rate_limits`                          | headers, not relayed | headers, not relayed |
| `response.metadata`, `codex.response.        | dropped (its headers | relayed (its headers |
| metadata`                                    | are still honoured)  | honoured too)        |
| `responsesapi.*` (`websocket_timing`): the   | dropped              | dropped              |
| upstream socket's own timing, no HTTP twin   |                      |                      |
| `error`, every other `response.*`            | relayed              | relayed              |
| any other type (`codex.*`, unknown vendor)   | dropped              | relayed              |

Liveness while the upstream is silent (Codex CLI's idle timer ignores SSE
comments and WebSocket pings; it is reset by any event, known or not):

| stream                                       | public               | codex                |
|----------------------------------------------|----------------------|----------------------|
| nothing sent yet (queued before              | nothing: the status  | `codex.keepalive`    |
| `response.created`)                          | stays open to retry  | event (starts 200)   |
| events sent                                  | `: keepalive` comment| `codex.keepalive`    |

`response.created`, `response.in_progress` and `response.queued` are held
back (`HELD_TYPES`) until the first output event, so that an overload or auth
error right after them is still a retry (`event_relay`).
"""

from __future__ import annotations

import json
from enum import StrEnum

from responses_ws_bridge.core import sse


class ClientKind(StrEnum):
    PUBLIC = "public"
    CODEX = "codex"


class Disposition(StrEnum):
    RELAY = "relay"
    DROP = "drop"


RATE_LIMITS_TYPE = "codex.rate_limits"
METADATA_TYPES = frozenset({"response.metadata", "codex.response.metadata"})
KEEPALIVE_TYPE = "codex.keepalive"
# Lifecycle events before any output: held back while a retry is still possible.
HELD_TYPES = frozenset({"response.created", "response.in_progress", "response.queued"})
_SOCKET_ONLY_PREFIX = "responsesapi."
_CODEX_SUFFIX = "/codex/responses"


def client_kind(path: str) -> ClientKind:
    """Who the client is, from its request path (query aside)."""
    bare = path.split("?", 1)[0].rstrip("/")
    return ClientKind.CODEX if bare.endswith(_CODEX_SUFFIX) else ClientKind.PUBLIC


def is_public(event_type: str) -> bool:
    """Part of the public Responses event stream."""
    if event_type in METADATA_TYPES:
        return False
    return event_type == "error" or event_type.startswith("response.")


def disposition(event_type: str, kind: ClientKind) -> Disposition:
    """Whether an upstream event (other than `codex.rate_limits`) reaches this client."""
    if is_public(event_type):
        return Disposition.RELAY
    if kind is ClientKind.PUBLIC or event_type.startswith(_SOCKET_ONLY_PREFIX):
        return Disposition.DROP
    return Disposition.RELAY


_KEEPALIVE_EVENT = sse.encode_event(
    json.dumps({"type": KEEPALIVE_TYPE}, separators=(",", ":")), KEEPALIVE_TYPE
)


def keepalive(kind: ClientKind, *, started: bool) -> bytes | None:
    """What keeps this client's stream alive during upstream silence (None: nothing)."""
    if kind is ClientKind.CODEX:
        return _KEEPALIVE_EVENT
    return sse.KEEPALIVE if started else None
