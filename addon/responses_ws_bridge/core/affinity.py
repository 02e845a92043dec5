"""Request affinity: classify a request as hard, soft or none, and find its owner.

Keys are namespaced by what they identify (`session:`, `turn-state:`, `thread:`,
`conversation:`, `response:`, `prompt-cache:`), so the same value arriving as
`session_id` or `session-id` is one key, and a session id can never collide
with a prompt cache key.

Decisions:
- The affinity `key` is the first hard signal by precedence (headers
  x-codex-turn-state, session_id, session-id, x-codex-session-id, thread-id,
  conversation_id, x-codex-conversation-id; then body previous_response_id, then
  body conversation). `keys` holds every hard signal present, in that order: the
  shell binds all of them to the account that serves the request, and
  `owner_for` looks them up in order, so a fresh per-turn key (turn state)
  still finds the session its other headers already bound.
- `previous_response_id` is authoritative when its owner is known: the upstream
  only knows a response on the account that produced it, so that account wins
  over any header binding, even one that disagrees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from responses_ws_bridge.core import http_fields


class AffinityKind(StrEnum):
    HARD = "hard"
    SOFT = "soft"
    NONE = "none"


@dataclass(frozen=True)
class Affinity:
    """How one request is tied to an account.

    `key`: the primary binding key (None for NONE). `source`: where it came from,
    e.g. "header:session-id". `owner_hint`: the body's previous_response_id, to
    be looked up in the response-ownership store (its owner is authoritative).
    `keys`: every binding key present, primary first.
    """

    kind: AffinityKind
    key: str | None = None
    source: str | None = None
    owner_hint: str | None = None
    keys: tuple[str, ...] = ()


NO_AFFINITY = Affinity(AffinityKind.NONE)

# (header name, key namespace), in precedence order.
HARD_HEADERS: tuple[tuple[str, str], ...] = (
    ("x-codex-turn-state", "turn-state"),
    ("session_id", "session"),
    ("session-id", "session"),
    ("x-codex-session-id", "session"),
    ("thread-id", "thread"),
    ("conversation_id", "conversation"),
    ("x-codex-conversation-id", "conversation"),
)


def _header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    """The first value of `name` that is not blank, stripped."""
    return next((v.strip() for v in http_fields.values(headers, name) if v.strip()), None)


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _conversation_id(value: Any) -> str | None:
    # The Responses API accepts `conversation` as an id or as {"id": ...}.
    if isinstance(value, Mapping):
        return _text(value.get("id"))
    return _text(value)


def classify(headers: Sequence[tuple[str, str]], body: Mapping[str, Any]) -> Affinity:
    """The affinity of a request, from its headers (any case) and its JSON body."""
    found: list[tuple[str, str]] = []  # (key, source), precedence order
    for name, namespace in HARD_HEADERS:
        value = _header(headers, name)
        if value is not None:
            found.append((f"{namespace}:{value}", f"header:{name}"))
    previous = _text(body.get("previous_response_id"))
    if previous is not None:
        found.append((f"response:{previous}", "body:previous_response_id"))
    conversation = _conversation_id(body.get("conversation"))
    if conversation is not None:
        found.append((f"conversation:{conversation}", "body:conversation"))

    if found:
        keys = tuple(dict.fromkeys(key for key, _ in found))  # same key twice counts once
        return Affinity(
            AffinityKind.HARD, key=found[0][0], source=found[0][1], owner_hint=previous, keys=keys
        )
    cache_key = _text(body.get("prompt_cache_key"))
    if cache_key is not None:
        key = f"prompt-cache:{cache_key}"
        return Affinity(AffinityKind.SOFT, key=key, source="body:prompt_cache_key", keys=(key,))
    return NO_AFFINITY


def owner_for(
    affinity: Affinity,
    *,
    bound_account: Callable[[str], str | None],
    response_owner: Callable[[str], str | None],
) -> str | None:
    """The account this request belongs to, or None when it is not tied to one yet.

    For HARD the answer is the owner (only it may serve); for SOFT it is a
    preference; NONE has no owner. Order: the owner of previous_response_id,
    then the first of `keys` with a binding. None for a HARD request means its
    first request: the shell chooses an account and binds every key to it.
    """
    if affinity.kind is AffinityKind.NONE:
        return None
    if affinity.owner_hint is not None:
        owner = response_owner(affinity.owner_hint)
        if owner is not None:
            return owner
    for key in affinity.keys:
        account = bound_account(key)
        if account is not None:
            return account
    return None


SessionKey = tuple[str, str | None]  # (affinity key, account id; None in pass-through)


# Keys that change from turn to turn: a socket is not keyed by them when a
# steadier one (the session, thread or conversation) is present.
_PER_TURN_NAMESPACES = ("turn-state:", "response:")


def socket_key(affinity: Affinity) -> str | None:
    """The key a session's upstream socket is kept under: its steadiest one.

    Codex CLI keeps one WebSocket for a whole session (a prewarm, then every
    turn), while `x-codex-turn-state` and `previous_response_id` change each
    turn; keyed by them, every turn would open a socket of its own.
    """
    for key in affinity.keys:
        if not key.startswith(_PER_TURN_NAMESPACES):
            return key
    return affinity.key


def counted_key(affinity: Affinity) -> str | None:
    """The one key a session is counted by among its account's bound sessions, or None.

    Its steadiest key (`socket_key`): Codex CLI sends `session-id` and
    `thread-id`, two keys of one session, counted once. A key that changes every
    turn (turn state, previous_response_id) names no session: counted, a chain of
    responses would count once per turn.
    """
    key = socket_key(affinity)
    if key is None or key.startswith(_PER_TURN_NAMESPACES):
        return None
    return key


def session_key(affinity: Affinity, account_id: str | None) -> SessionKey | None:
    """Which idle upstream socket may carry this request, or None: a new one, never kept.

    A socket holds the previous response's state for its session on its
    account (with `store: false` nothing else does), so it is reused only for
    the same session (`socket_key`) on the same account.
    """
    key = socket_key(affinity)
    if key is None:
        return None
    return (key, account_id)
