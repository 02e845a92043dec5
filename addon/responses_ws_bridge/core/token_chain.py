"""Which rotated tokens an account uses when several instances refresh it, and when to refresh.

Pure decisions over plain values; `shell.token_refresher` does the I/O (the
shared store's lock and records, the token endpoint, the local state file).

A *chain* is one login's tokens as they rotate: it starts from a refresh token
an accounts file gave (its `origin`), each refresh adds one to `generation`,
and `known` lists the fingerprints of every refresh token the chain (and the
chains it replaced) ever held. A refresh token in a file that the chain knows
is history (spent, or the chain's own); one it does not know is a fresh login.

Which chain an instance uses (`choose_chain`), from its accounts file's
refresh token, its own durable copy (`local`, the tokens file) and the
store's (`stored`):

| the file's token                     | stored                      | decision                   |
|--------------------------------------|-----------------------------|----------------------------|
| not in local's chain, known to store | any                         | UseChain(stored): an older |
|                                      |                             | file                       |
| not in local's chain, not in store's | any or nothing              | Publish a new chain from   |
|                                      |                             | the file, generation above |
| in local's chain                     | nothing                     | Publish local              |
| in local's chain, not in store's     | any                         | Publish local (above the   |
|                                      |                             | store's generation)        |
| in local's chain                     | superseded by local         | Publish local              |
| in local's chain                     | supersedes local            | UseChain(stored)           |
| in local's chain                     | same origin, local newer    | Publish local (the store   |
|                                      |                             | lost a generation)         |
| in local's chain                     | otherwise                   | UseChain(stored)           |

A store write is accepted (`may_write`) only on top of the generation it was
based on, and only from a lock holder whose fencing number is not older than
the last writer's: a holder that stalled past its lease never writes an older
result over a newer one.

When to refresh (`refresh_step`), under the account's lock:

| chain           | token              | backoff running | decision                              |
|-----------------|--------------------|-----------------|---------------------------------------|
| refused         | any                | any             | FailFast(permanent)                   |
| usable          | not due, not the   | any             | UseToken                              |
|                 | one a 401 refused  |                 |                                       |
| usable          | due or refused 401 | yes             | UseToken while not expired and no 401 |
|                 |                    |                 | refused it, else FailFast(backoff)    |
| usable          | due or refused 401 | no              | RefreshNow                            |

A failed refresh (no answer, 5xx, garbage, or an access token that is due
already) backs off per account (`refresh_backoff`): one refresh per window,
never one per request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from responses_ws_bridge.core.retry_policy import backoff_delay
from responses_ws_bridge.core.token_refresh import Tokens, fingerprint, jwt_expiry, needs_refresh

# Fingerprints of past refresh tokens kept per chain: enough to recognise any file a
# machine could still hold, bounded so a record stays small.
MAX_KNOWN = 64
BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 300.0


@dataclass(frozen=True, repr=False)
class Chain:
    """One login's current tokens, where they came from, and what came before; never printed."""

    tokens: Tokens
    generation: int
    origin: str
    known: tuple[str, ...]
    refused: str | None = None

    def __repr__(self) -> str:
        return f"Chain(generation={self.generation}, refused={self.refused!r}, <redacted>)"

    __str__ = __repr__

    @property
    def tag(self) -> str:
        """The fingerprint of the chain's current access token (what a 401 names)."""
        return fingerprint(self.tokens.access_token)

    def knows(self, refresh_token: str) -> bool:
        return fingerprint(refresh_token) in self.known

    def rotated(self, tokens: Tokens) -> Chain:
        """The chain after a refresh answered `tokens`."""
        known = _merge((fingerprint(tokens.refresh_token),), self.known)
        return Chain(tokens, self.generation + 1, self.origin, known)

    def refusing(self, reason: str) -> Chain:
        return replace(self, refused=reason)


def file_chain(tokens: Tokens, *, generation: int = 0, history: Sequence[str] = ()) -> Chain:
    """The chain an accounts file's tokens start; `history`: the tags of chains it replaces."""
    tag = fingerprint(tokens.refresh_token)
    return Chain(tokens, generation, tag, _merge((tag,), history))


def _merge(first: Sequence[str], *more: Sequence[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for tags in (first, *more):
        for tag in tags:
            seen.setdefault(tag, None)
    return tuple(seen)[:MAX_KNOWN]


# --- which chain ------------------------------------------------------------------------------


@dataclass(frozen=True)
class UseChain:
    """The store's chain is the newest: use it (and keep it as the local copy)."""

    chain: Chain


@dataclass(frozen=True)
class Publish:
    """Write `chain` to the store (on top of the stored generation, if any), then use it."""

    chain: Chain


ChainChoice = UseChain | Publish


def _supersedes(newer: Chain, older: Chain) -> bool:
    """`newer` is a later login than `older`: it started from a token after `older`'s origin."""
    return newer.origin != older.origin and older.origin in newer.known


def choose_chain(file_tokens: Tokens, local: Chain | None, stored: Chain | None) -> ChainChoice:
    """The chain to use (see the module table)."""
    tag = fingerprint(file_tokens.refresh_token)
    mine = local if local is not None and tag in local.known else None
    if mine is None:
        if stored is not None and tag in stored.known:
            return UseChain(stored)  # an older file: the store has moved past it
        # A login this machine's copy never held: the file changed, and it wins.
        history = [*(local.known if local else ()), *(stored.known if stored else ())]
        top = max((c.generation for c in (local, stored) if c is not None), default=-1)
        return Publish(file_chain(file_tokens, generation=top + 1, history=history))
    if stored is None:
        return Publish(mine)
    if tag not in stored.known or _supersedes(mine, stored):
        # The store never saw this machine's login (it lost its data, or the login is newer).
        generation = max(mine.generation, stored.generation + 1)
        return Publish(replace(mine, generation=generation, known=_merge(mine.known, stored.known)))
    if _supersedes(stored, mine):
        return UseChain(stored)
    if mine.origin == stored.origin and mine.generation > stored.generation:
        return Publish(mine)
    return UseChain(stored)


def may_write(
    current: tuple[int, int] | None, *, base_generation: int | None, fence: int | None
) -> bool:
    """Whether a write on top of `base_generation` (None: where nothing is stored) is accepted.

    `current`: the stored (generation, fencing number of its writer), None when nothing
    is stored (a first record, or a store that lost its data: any write is news then).
    `fence`: the writer's lock (None: a publish, which needs no lock since it only ever
    lands on the generation it read).

    | stored            | base generation | fence               | accepted |
    |-------------------|-----------------|---------------------|----------|
    | nothing           | any             | any                 | yes      |
    | generation g      | not g           | any                 | no       |
    | generation g      | g               | None (a publish)    | yes      |
    | generation g      | g               | >= the last writer's| yes      |
    | generation g      | g               | < the last writer's | no       |
    """
    if current is None:
        return True
    generation, last_fence = current
    if base_generation != generation:
        return False
    return fence is None or fence >= last_fence


# --- when to refresh --------------------------------------------------------------------------


@dataclass(frozen=True)
class UseToken:
    tokens: Tokens


@dataclass(frozen=True)
class RefreshNow:
    pass


@dataclass(frozen=True)
class FailFast:
    """No usable token now: `reason` is a code, `retry_after_s` when to try again."""

    reason: str
    permanent: bool = False
    retry_after_s: float | None = None


RefreshStep = UseToken | RefreshNow | FailFast

BACKOFF_REASON = "token_refresh_backoff"


def refresh_step(
    chain: Chain,
    *,
    rejected_tag: str | None,
    wall_now: float,
    margin_s: float,
    retry_at: float | None,
    last_failure: str | None = None,
) -> RefreshStep:
    """What to do for a request that needs the account's token (see the module table).

    `rejected_tag`: the fingerprint of the token a handshake just refused with 401,
    if that is why. `retry_at`: the wall time before which no refresh is tried.
    """
    if chain.refused is not None:
        return FailFast(chain.refused, permanent=True)
    access = chain.tokens.access_token
    rejected = rejected_tag is not None and rejected_tag == chain.tag
    due = rejected or needs_refresh(
        access, has_refresh_token=True, wall_now=wall_now, margin_s=margin_s
    )
    if not due:
        return UseToken(chain.tokens)
    if retry_at is not None and wall_now < retry_at:
        exp = jwt_expiry(access)
        if access and not rejected and (exp is None or exp > wall_now):
            return UseToken(chain.tokens)  # only inside the margin: it still serves
        return FailFast(last_failure or BACKOFF_REASON, retry_after_s=retry_at - wall_now)
    return RefreshNow()


def refresh_backoff(
    failures: int, *, jitter: float, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S
) -> float:
    """Seconds before the next refresh after `failures` failed ones in a row (>= 1)."""
    return backoff_delay(max(0, failures - 1), base=base_s, cap=cap_s, jitter=jitter)


def fresh_enough(tokens: Tokens, *, wall_now: float, margin_s: float) -> bool:
    """A refresh answered a token that is not due at once (else it counts as a failure)."""
    return not needs_refresh(
        tokens.access_token, has_refresh_token=True, wall_now=wall_now, margin_s=margin_s
    )


# --- waiting for another instance's refresh ---------------------------------------------------


@dataclass(frozen=True)
class Adopt:
    """Another instance wrote a newer generation: read it and use it."""


@dataclass(frozen=True)
class KeepWaiting:
    pass


@dataclass(frozen=True)
class TakeOver:
    """The lock is free and nothing new was written: try to take the lock."""


WaitStep = Adopt | KeepWaiting | TakeOver | FailFast

REFRESH_TIMEOUT = "token_refresh_timeout"


def wait_step(
    *,
    seen_generation: int | None,
    generation: int | None,
    lock_held: bool,
    retry_at: float | None,
    last_failure: str | None,
    wall_now: float,
    deadline: float,
) -> WaitStep:
    """One look at the store while another instance holds the account's refresh lock.

    | store now                             | step                                   |
    |---------------------------------------|----------------------------------------|
    | a generation other than the one seen  | Adopt                                  |
    | lock free, a failure backoff running  | FailFast(the holder's failure)         |
    | lock free, nothing new                | TakeOver (the holder gave up or died:  |
    |                                       | its lease expired)                     |
    | lock held, before the deadline        | KeepWaiting                            |
    | lock held, past the deadline          | FailFast(token_refresh_timeout)        |
    """
    if generation != seen_generation:
        return Adopt()
    if not lock_held:
        if retry_at is not None and wall_now < retry_at:
            return FailFast(last_failure or BACKOFF_REASON, retry_after_s=retry_at - wall_now)
        return TakeOver()
    if wall_now >= deadline:
        return FailFast(REFRESH_TIMEOUT, retry_after_s=1.0)
    return KeepWaiting()


# --- the durable copies -----------------------------------------------------------------------


def chain_to_json(chain: Chain, *, wall_now: float) -> dict[str, Any]:
    """One account's entry in the local tokens file, and the plaintext of a sealed record."""
    entry: dict[str, Any] = {
        "origin": chain.origin,
        "access_token": chain.tokens.access_token,
        "refresh_token": chain.tokens.refresh_token,
        "generation": chain.generation,
        "known": list(chain.known),
        "refreshed_at": int(wall_now),
    }
    if chain.tokens.id_token is not None:
        entry["id_token"] = chain.tokens.id_token
    if chain.refused is not None:
        entry["refused"] = chain.refused
    return entry


def chain_from_json(entry: Any, file_tokens: Tokens | None = None) -> Chain | None:
    """An entry written by `chain_to_json`, or by the older one-pair format (version 1).

    A version-1 refusal without tokens reads as the file's tokens, refused, when the
    file still holds the token it names.
    """
    if not isinstance(entry, Mapping):
        return None
    origin = entry.get("origin")
    if not isinstance(origin, str):
        return None
    refused = entry.get("refused")
    refused = refused if isinstance(refused, str) and refused else None
    access, refresh = entry.get("access_token"), entry.get("refresh_token")
    if not (isinstance(access, str) and access and isinstance(refresh, str) and refresh):
        if refused is None or file_tokens is None:
            return None
        if fingerprint(file_tokens.refresh_token) != origin:
            return None
        return file_chain(file_tokens).refusing(refused)
    id_token = entry.get("id_token")
    tokens = Tokens(access, refresh, id_token if isinstance(id_token, str) else None)
    generation = entry.get("generation")
    known = entry.get("known")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        generation = 1  # version 1: refreshed at least once
    tags = [t for t in known if isinstance(t, str)] if isinstance(known, list) else []
    known_tags = _merge((fingerprint(refresh),), tags, (origin,))
    return Chain(tokens, generation, origin, known_tags, refused)
