"""Prewarms: `response.create` with `generate: false`, a session warmed but nothing generated.

Codex CLI sends one on a new WebSocket before the first turn (a client may
send one over HTTP too); the backend answers `response.created` then a
`response.completed` with empty output. That answer proves nothing about
the account and leaves nothing another request could continue from.

| request       | its answer                        | the turn                                     |
|---------------|-----------------------------------|----------------------------------------------|
| `generate:    | created, completed, no output     | a prewarm: the account is not marked         |
| false`        |                                   | successful, no `previous_response_id` owner, |
|               |                                   | no soft binding (anchor) is recorded; its    |
|               |                                   | events are held until the terminal one       |
| `generate:    | its socket fails after `response. | sent once more, free, on the same account:   |
| false`        | created` (held, so unseen)        | the client never saw the first try           |
| `generate:    | output events (the upstream did   | a normal turn (it produced something)        |
| false`        | not honour `generate`)            |                                              |
| anything else | any                               | a normal turn                                |

A hard session's keys are bound to the account before the prewarm is sent
(`attempt_plan`): the socket that holds the prewarmed state is there, and
the next turn must find it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def is_prewarm(body: Mapping[str, Any]) -> bool:
    """The request asks for a prewarm (`generate` is exactly false)."""
    return body.get("generate") is False


def counts(*, prewarm: bool, output_seen: bool) -> bool:
    """Whether a completed turn counts for health, owners and bindings."""
    return not prewarm or output_seen
