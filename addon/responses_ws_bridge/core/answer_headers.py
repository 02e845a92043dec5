"""Which upstream answer headers go onto the client's HTTP response.

Codex CLI reads these from the HTTP response of its request, and from the
101 when it speaks WebSocket itself; the bridge carries them from the 101 of
the upstream socket that serves the turn, and from a `response.metadata`
event's `headers` map when it arrives before the client's response head goes
out (the later word wins).

| header                  | why the client wants it                              | from          |
|-------------------------|------------------------------------------------------|---------------|
| `x-codex-turn-state`    | sticky routing: sent back unchanged within the turn  | 101, metadata |
| `x-reasoning-included`  | the server already counts reasoning tokens           | 101, metadata |
| `x-models-etag`         | the model catalog changed: refresh it                | 101, metadata |
| `openai-model`          | the model the server actually chose                  | 101, metadata |
| `x-codex-*` and other   | rate-limit families (`rate_limits`)                  | 101, frames,  |
| rate-limit families     |                                                      | error headers |
| anything else           | not passed: it describes the upstream connection     |               |

A turn state that arrives only after the head went out is still honoured:
the bridge keeps it for the session, puts it on the next answer from the
same socket, and sends it in the handshake of the session's next socket
when the client did not send one (`turn_engine`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from responses_ws_bridge.core import http_fields

TURN_STATE = "x-codex-turn-state"
PASSED = (TURN_STATE, "x-reasoning-included", "x-models-etag", "openai-model")
# A value an event chose must still be a header value (no line breaks, no controls).
_FIELD_VALUE = re.compile(r"[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?")


def from_handshake(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The passed headers of a 101, by lower-case name."""
    pairs = list(headers)
    found = {name: http_fields.header(pairs, name) for name in PASSED}
    return {name: value for name, value in found.items() if value is not None}


def from_metadata(event: Mapping[str, Any]) -> dict[str, str]:
    """The passed headers in a metadata event's `headers` map (string values only)."""
    headers = event.get("headers")
    if not isinstance(headers, Mapping):
        return {}
    pairs = [(str(k), v) for k, v in headers.items() if isinstance(v, str)]
    return {k: v for k, v in from_handshake(pairs).items() if _FIELD_VALUE.fullmatch(v)}
