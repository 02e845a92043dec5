"""What a request may do when the shared store answers, is silent, or disagrees with what
this instance remembers. Pure decisions over plain values.

Owner (`owner_decision`), from the store's answer and this instance's own memory:

| kind       | store says          | local memory | decision                         |
|------------|---------------------|--------------|----------------------------------|
| none       | anything            | anything     | Unbound()                        |
| hard/soft  | owner X             | anything     | Owned(X, from_store=True)        |
| hard/soft  | no owner            | Y or none    | Unbound(prefer=Y): bind, store wins |
| hard       | unavailable         | Y            | Owned(Y, from_store=False)       |
| hard       | unavailable         | none         | FailClosed                       |
| soft       | unavailable         | Y or none    | Unbound(prefer=Y), local state   |

Binding a new key (`bind_decision`), after choosing account C:

| kind | store says     | decision                       |
|------|----------------|--------------------------------|
| any  | owner X        | Owned(X) (X is C unless another instance won the race) |
| hard | unavailable    | FailClosed: one owner cannot be guaranteed |
| soft | unavailable    | Owned(C, from_store=False)     |

A hard request is never served by an account the store or this instance
did not name as its owner.
"""

from __future__ import annotations

from responses_ws_bridge.core.affinity import Affinity, AffinityKind, owner_for
from responses_ws_bridge.core.failures import STATE_STORE_UNAVAILABLE
from responses_ws_bridge.core.turn_commands import FailClosed, Owned, OwnerDecision, Unbound
from responses_ws_bridge.state.guarded import StateUnavailable
from responses_ws_bridge.state.store import Lookup

__all__ = [
    "STATE_STORE_UNAVAILABLE",
    "FailClosed",
    "Owned",
    "OwnerDecision",
    "Unbound",
    "bind_decision",
    "owner_decision",
    "stored_owner",
]


def stored_owner(affinity: Affinity, found: Lookup) -> str | None:
    """The owner the store names, by the same precedence as the in-memory lookup."""

    def bound(key: str) -> str | None:
        binding = found.bindings.get(key)
        return binding.account_id if binding is not None else None

    return owner_for(affinity, bound_account=bound, response_owner=lambda _: found.response_owner)


def owner_decision(
    kind: AffinityKind, stored: str | StateUnavailable | None, local: str | None
) -> OwnerDecision:
    if kind is AffinityKind.NONE:
        return Unbound()
    if isinstance(stored, str):
        return Owned(stored)
    if stored is None:
        return Unbound(prefer=local)
    if kind is AffinityKind.HARD:
        return Owned(local, from_store=False) if local is not None else FailClosed(stored.reason)
    return Unbound(prefer=local)


def bind_decision(
    kind: AffinityKind, stored: str | StateUnavailable, chosen: str
) -> Owned | FailClosed:
    if isinstance(stored, str):
        return Owned(stored)
    if kind is AffinityKind.HARD:
        return FailClosed(stored.reason)
    return Owned(chosen, from_store=False)
