"""The state-store interface: exactly what the bridge keeps about sessions and accounts.

Every time here is wall-clock epoch seconds (`time.time`), the one clock that
several instances share. Affinity keys are passed as the bridge knows them
(`session:…`); a shared store keeps only their fingerprints. Binding TTLs are
idle times: reading a binding counts as a use and restarts its TTL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.bindings import Binding

__all__ = [
    "AccountHealthRecord",
    "Binding",
    "BindingLimits",
    "Lease",
    "Lookup",
    "RefreshLock",
    "StateStore",
    "TokenRecord",
    "TokenView",
]


@dataclass(frozen=True)
class BindingLimits:
    """Idle TTLs (inf: none) and, for the in-memory store, the most entries of each kind."""

    hard_ttl_s: float = 24 * 3600.0
    soft_ttl_s: float = 24 * 3600.0
    owner_ttl_s: float = 24 * 3600.0
    max_entries: int = 100_000

    def ttl_for(self, kind: AffinityKind) -> float:
        return self.soft_ttl_s if kind is AffinityKind.SOFT else self.hard_ttl_s

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        for ttl in (self.hard_ttl_s, self.soft_ttl_s, self.owner_ttl_s):
            if not ttl > 0:
                raise ValueError("binding TTLs must be positive (inf for none)")


def ttl_ms(ttl_s: float) -> int:
    """A TTL for the server in whole milliseconds; 0 means no expiry."""
    return 0 if math.isinf(ttl_s) else max(1, math.ceil(ttl_s * 1000))


@dataclass(frozen=True)
class AccountHealthRecord:
    """What every instance knows about one account.

    `disabled`: the reason, until the accounts file changes. `cooldown_until`
    is in force while later than now (a cooldown for a rate limit, or for a
    fault rate one instance's pool saw). `rate_limits`: the latest figures the upstream sent,
    flat (e.g. `{"primary.used_percent": 42.0}`).
    """

    disabled: str | None = None
    cooldown_until: float | None = None
    cooldown_reason: str = ""
    rate_limits: Mapping[str, float] = field(default_factory=dict)


HEALTHY_RECORD = AccountHealthRecord()


@dataclass(frozen=True)
class Lease:
    """One request in flight on an account, until `expires_at` unless renewed."""

    id: str
    account_id: str
    expires_at: float


@dataclass(frozen=True)
class Lookup:
    """The owner of a response and the bindings of affinity keys, read in one round trip."""

    response_owner: str | None
    bindings: Mapping[str, Binding]


@dataclass(frozen=True, repr=False)
class TokenRecord:
    """One account's current token chain as the store keeps it.

    `sealed` is the chain encrypted under `bridge_state_secret` (`state.sealing`):
    no token is ever stored in clear. In clear are only the chain's
    `generation`, the fencing number of the lock holder that wrote it, and
    the failure backoff every instance respects (`retry_at`, wall clock).
    """

    generation: int
    fence: int
    sealed: str
    retry_at: float | None = None
    failures: int = 0
    last_failure: str | None = None

    def __repr__(self) -> str:
        return f"TokenRecord(generation={self.generation}, fence={self.fence}, <sealed>)"


@dataclass(frozen=True)
class TokenView:
    """The record and whether an instance holds the account's refresh lock, read together."""

    record: TokenRecord | None
    locked: bool


@dataclass(frozen=True)
class RefreshLock:
    """`fence` is ours when the lock was taken (None: another instance holds it, for
    `ttl_s` more seconds)."""

    fence: int | None
    ttl_s: float = 0.0


class StateStore(Protocol):
    # affinity bindings

    async def bind(self, key: str, binding: Binding) -> Binding:
        """Bind `key` unless it is bound; returns the binding in force (first writer wins).

        A `counted` binding counts in `bound_sessions`; bindings read back need not
        say whether they count.
        """
        ...

    async def bind_new(self, key: str, binding: Binding) -> Binding | None:
        """`bind` for a key no instance has offered an owner for: None (nothing bound) while
        the store recovers from losing its data, so that instances that knew the key's
        owner re-offer it first."""
        ...

    async def binding(self, key: str) -> Binding | None: ...

    async def rebind(self, key: str, binding: Binding) -> None:
        """Bind `key` whatever it was bound to (a soft key moving to another account)."""
        ...

    async def forget(self, key: str) -> bool: ...

    async def forget_account(self, account_id: str) -> int:
        """Drop every binding and response owner of a removed account; returns how many."""
        ...

    async def bound_sessions(self, account_ids: Sequence[str]) -> dict[str, int]:
        """Live `counted` bindings per account: the sessions each account holds.

        Cheap enough to ask before every choice; a binding that expired is never
        counted, one kept alive by its reads still is.
        """
        ...

    # response ownership

    async def set_response_owner(self, response_id: str, account_id: str) -> None: ...

    async def response_owner(self, response_id: str) -> str | None: ...

    async def lookup(self, response_id: str | None, keys: Sequence[str]) -> Lookup:
        """What `affinity.owner_for` needs for one request."""
        ...

    # account health

    async def health(self, account_ids: Sequence[str]) -> dict[str, AccountHealthRecord]: ...

    async def disable(self, account_id: str, reason: str) -> None: ...

    async def enable(self, account_id: str) -> None:
        """The accounts file changed: a disabled account may serve again."""
        ...

    async def cool_down(self, account_id: str, until: float, reason: str) -> float:
        """Cool down until `until` unless a longer cooldown runs; returns the one in force."""
        ...

    async def clear_failures(self, account_id: str) -> None:
        """A success: the cooldown ends; a disabled account stays disabled."""
        ...

    async def set_rate_limits(self, account_id: str, figures: Mapping[str, float]) -> None: ...

    # in-flight leases

    async def acquire_lease(self, account_id: str, ttl_s: float) -> Lease: ...

    async def renew_lease(self, lease: Lease, ttl_s: float) -> Lease | None:
        """The lease with a later expiry; None if it had already expired or was released."""
        ...

    async def release_lease(self, lease: Lease) -> None: ...

    async def in_flight(self, account_ids: Sequence[str]) -> dict[str, int]:
        """Live leases per account (expired ones are pruned, never counted)."""
        ...

    # token chains (accounts with a refresh_token)

    async def token_view(self, account_id: str) -> TokenView: ...

    async def write_tokens(
        self,
        account_id: str,
        record: TokenRecord,
        *,
        base_generation: int | None,
        fence: int | None,
    ) -> bool:
        """Write `record` if `token_chain.may_write` allows it on top of what is stored."""
        ...

    async def take_refresh_lock(self, account_id: str, lease_s: float) -> RefreshLock:
        """Set-if-absent with expiry; a taken lock gets a fencing number above every earlier one."""
        ...

    async def release_refresh_lock(self, account_id: str, fence: int) -> None:
        """Release the lock if it is still ours (an expired one may be another's now)."""
        ...

    async def check_epoch(self) -> bool:
        """True when the store lost its data since this instance last looked (a shared store
        restarted empty); the store then recovers for a grace period (`bind_new`, and no
        refresh lock is granted) while instances re-offer what they know."""
        ...

    async def close(self) -> None: ...
