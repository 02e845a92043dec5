"""Today's in-process state behind the `StateStore` interface: nothing to install.

Bindings and response owners are `core.bindings.MemoryBindingStore`s (bounded
by count, idle TTL, least recently used evicted first), one per kind so each
has its own TTL. Health follows `health_record`; leases expire by the clock
like the shared store's. No locking: the bridge runs on one event loop and no
method awaits between reading and writing.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.bindings import Binding, BindingRow, MemoryBindingStore
from responses_ws_bridge.core.token_chain import may_write
from responses_ws_bridge.state import health_record
from responses_ws_bridge.state.store import (
    HEALTHY_RECORD,
    AccountHealthRecord,
    BindingLimits,
    Lease,
    Lookup,
    RefreshLock,
    TokenRecord,
    TokenView,
)


class MemoryStateStore:
    def __init__(
        self, limits: BindingLimits | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.limits = limits = limits or BindingLimits()
        self._clock = clock
        self._hard = MemoryBindingStore(limits.max_entries, limits.hard_ttl_s, clock)
        self._soft = MemoryBindingStore(limits.max_entries, limits.soft_ttl_s, clock)
        self._owners = MemoryBindingStore(limits.max_entries, limits.owner_ttl_s, clock)
        self._health: dict[str, AccountHealthRecord] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._lease_ids = itertools.count(1)
        self._tokens: dict[str, TokenRecord] = {}
        # account -> (fence, expires at)
        self._locks: dict[str, tuple[int, float]] = {}
        self._fences: dict[str, int] = {}

    def _table(self, kind: AffinityKind) -> MemoryBindingStore:
        return self._soft if kind is AffinityKind.SOFT else self._hard

    def binding_rows(self) -> list[BindingRow]:
        """Live bindings, for the `bridge.sessions` command (raw keys: this process only)."""
        return sorted(self._hard.items() + self._soft.items(), key=lambda row: row.last_used)

    # affinity bindings

    async def bind(self, key: str, binding: Binding) -> Binding:
        current = self._lookup(key)
        if current is not None:
            return current
        self._table(binding.kind).set(key, binding)
        return binding

    async def bind_new(self, key: str, binding: Binding) -> Binding | None:
        return await self.bind(key, binding)

    async def binding(self, key: str) -> Binding | None:
        return self._lookup(key)

    async def rebind(self, key: str, binding: Binding) -> None:
        # A key lives under one kind only.
        for table in (self._hard, self._soft):
            if table is not self._table(binding.kind):
                table.delete(key)
        self._table(binding.kind).set(key, binding)

    async def forget(self, key: str) -> bool:
        hard = self._hard.delete(key)
        soft = self._soft.delete(key)
        return hard or soft

    async def forget_account(self, account_id: str) -> int:
        return sum(t.remove_account(account_id) for t in (self._hard, self._soft, self._owners))

    async def bound_sessions(self, account_ids: Sequence[str]) -> dict[str, int]:
        hard, soft = self._hard.bound_sessions(), self._soft.bound_sessions()
        return {a: hard.get(a, 0) + soft.get(a, 0) for a in account_ids}

    def _lookup(self, key: str) -> Binding | None:
        return self._hard.get(key) or self._soft.get(key)

    # response ownership

    async def set_response_owner(self, response_id: str, account_id: str) -> None:
        self._owners.set(response_id, Binding(account_id))

    async def response_owner(self, response_id: str) -> str | None:
        owner = self._owners.get(response_id)
        return owner.account_id if owner is not None else None

    async def lookup(self, response_id: str | None, keys: Sequence[str]) -> Lookup:
        owner = await self.response_owner(response_id) if response_id is not None else None
        found = {key: b for key in keys if (b := self._lookup(key)) is not None}
        return Lookup(owner, found)

    # account health

    async def health(self, account_ids: Sequence[str]) -> dict[str, AccountHealthRecord]:
        return {a: self._record(a) for a in account_ids}

    def _record(self, account_id: str) -> AccountHealthRecord:
        return self._health.get(account_id, HEALTHY_RECORD)

    async def disable(self, account_id: str, reason: str) -> None:
        self._health[account_id] = replace(self._record(account_id), disabled=reason)

    async def enable(self, account_id: str) -> None:
        self._health[account_id] = replace(self._record(account_id), disabled=None)

    async def cool_down(self, account_id: str, until: float, reason: str) -> float:
        record = health_record.cooled(self._record(account_id), until, reason)
        self._health[account_id] = record
        assert record.cooldown_until is not None
        return record.cooldown_until

    async def clear_failures(self, account_id: str) -> None:
        self._health[account_id] = health_record.cleared(self._record(account_id))

    async def set_rate_limits(self, account_id: str, figures: Mapping[str, float]) -> None:
        self._health[account_id] = replace(self._record(account_id), rate_limits=dict(figures))

    # in-flight leases

    async def acquire_lease(self, account_id: str, ttl_s: float) -> Lease:
        lease = Lease(f"m{next(self._lease_ids)}", account_id, self._clock() + ttl_s)
        self._leases.setdefault(account_id, {})[lease.id] = lease.expires_at
        return lease

    async def renew_lease(self, lease: Lease, ttl_s: float) -> Lease | None:
        live = self._live_leases(lease.account_id)
        if lease.id not in live:
            return None
        renewed = replace(lease, expires_at=self._clock() + ttl_s)
        live[lease.id] = renewed.expires_at
        return renewed

    async def release_lease(self, lease: Lease) -> None:
        self._leases.get(lease.account_id, {}).pop(lease.id, None)

    async def in_flight(self, account_ids: Sequence[str]) -> dict[str, int]:
        return {a: len(self._live_leases(a)) for a in account_ids}

    def _live_leases(self, account_id: str) -> dict[str, float]:
        leases = self._leases.setdefault(account_id, {})
        now = self._clock()
        for lease_id in [i for i, expires in leases.items() if expires <= now]:
            del leases[lease_id]
        return leases

    # token chains

    def _lock(self, account_id: str) -> tuple[int, float] | None:
        held = self._locks.get(account_id)
        if held is not None and held[1] <= self._clock():
            del self._locks[account_id]
            return None
        return held

    async def token_view(self, account_id: str) -> TokenView:
        return TokenView(self._tokens.get(account_id), self._lock(account_id) is not None)

    async def write_tokens(
        self,
        account_id: str,
        record: TokenRecord,
        *,
        base_generation: int | None,
        fence: int | None,
    ) -> bool:
        current = self._tokens.get(account_id)
        stored = (current.generation, current.fence) if current is not None else None
        if not may_write(stored, base_generation=base_generation, fence=fence):
            return False
        self._tokens[account_id] = record
        return True

    async def take_refresh_lock(self, account_id: str, lease_s: float) -> RefreshLock:
        held = self._lock(account_id)
        if held is not None:
            return RefreshLock(None, held[1] - self._clock())
        record = self._tokens.get(account_id)
        fence = max(self._fences.get(account_id, 0), record.fence if record else 0) + 1
        self._fences[account_id] = fence
        self._locks[account_id] = (fence, self._clock() + lease_s)
        return RefreshLock(fence)

    async def release_refresh_lock(self, account_id: str, fence: int) -> None:
        held = self._lock(account_id)
        if held is not None and held[0] == fence:
            del self._locks[account_id]

    async def check_epoch(self) -> bool:
        return False  # this process's memory is lost only with the process

    async def close(self) -> None:
        return None
