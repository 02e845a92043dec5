"""Bounded key → account bindings: affinity keys and response ownership.

`BindingStore` is the interface the shell codes against, so a shared store can
replace the in-memory one later. `MemoryBindingStore` keeps entries in
last-use order: an entry idle longer than the TTL is gone, and past
`max_entries` the least recently used one is evicted. The same class serves
both affinity bindings (`session:…` → account, kind) and response ownership
(response id → account). Bindings marked `counted` (a session's
`affinity.counted_key`) are counted per account as it goes, so the account
choice can ask how many sessions each account holds without a scan. Time
comes from the injected clock; no locking, since the addon runs on one event
loop.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from responses_ws_bridge.core.affinity import Affinity, AffinityKind, counted_key


@dataclass(frozen=True)
class Binding:
    """`counted`: this key stands for its session in the account's bound-session count."""

    account_id: str
    kind: AffinityKind = AffinityKind.HARD
    counted: bool = False


def bindings_for(affinity: Affinity, account_id: str) -> list[tuple[str, Binding]]:
    """Every key of `affinity` bound to `account_id`; its session's one key counted."""
    counted = counted_key(affinity)
    return [(key, Binding(account_id, affinity.kind, key == counted)) for key in affinity.keys]


@dataclass(frozen=True)
class BindingRow:
    """One entry as listed by `items()`, for the `bridge.sessions` command."""

    key: str
    binding: Binding
    last_used: float


class BindingStore(Protocol):
    def get(self, key: str) -> Binding | None:
        """The live binding of `key`; a lookup counts as a use."""
        ...

    def set(self, key: str, binding: Binding) -> None: ...

    def delete(self, key: str) -> bool: ...

    def touch(self, key: str) -> bool:
        """Mark `key` used now (e.g. while a long stream runs); False if absent."""
        ...

    def items(self) -> list[BindingRow]:
        """Live entries, least recently used first."""
        ...

    def remove_account(self, account_id: str) -> int:
        """Drop every binding to `account_id`; returns how many."""
        ...

    def bound_sessions(self) -> dict[str, int]:
        """Live `counted` bindings per account (an account with none is absent)."""
        ...


@dataclass
class _Entry:
    binding: Binding
    last_used: float


class MemoryBindingStore:
    """In-memory `BindingStore`, bounded by count and idle time."""

    def __init__(self, max_entries: int, idle_ttl_s: float, clock: Callable[[], float]) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if idle_ttl_s <= 0:
            raise ValueError("idle_ttl_s must be positive")
        self.max_entries = max_entries
        self.idle_ttl_s = idle_ttl_s
        self._clock = clock
        # Ordered by last use, oldest first: expiry and eviction both pop from the front.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # Counted entries per account, kept in step by `_add` and `_remove`.
        self._sessions: Counter[str] = Counter()

    def __len__(self) -> int:
        self.prune()
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._live(key, self._clock()) is not None

    def get(self, key: str) -> Binding | None:
        now = self._clock()
        entry = self._live(key, now)
        if entry is None:
            return None
        self._use(key, entry, now)
        return entry.binding

    def set(self, key: str, binding: Binding) -> None:
        now = self._clock()
        self._prune(now)
        self._remove(key)
        self._add(key, _Entry(binding, now))
        while len(self._entries) > self.max_entries:
            self._remove(next(iter(self._entries)))

    def delete(self, key: str) -> bool:
        return self._remove(key) is not None

    def touch(self, key: str) -> bool:
        now = self._clock()
        entry = self._live(key, now)
        if entry is None:
            return False
        self._use(key, entry, now)
        return True

    def items(self) -> list[BindingRow]:
        self.prune()
        return [BindingRow(key, e.binding, e.last_used) for key, e in self._entries.items()]

    def remove_account(self, account_id: str) -> int:
        doomed = [k for k, e in self._entries.items() if e.binding.account_id == account_id]
        for key in doomed:
            self._remove(key)
        return len(doomed)

    def bound_sessions(self) -> dict[str, int]:
        self.prune()
        return dict(self._sessions)

    def prune(self) -> int:
        """Drop every expired entry now; returns how many."""
        return self._prune(self._clock())

    def _expired(self, entry: _Entry, now: float) -> bool:
        return now - entry.last_used > self.idle_ttl_s

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._expired(entry, now):
            self._remove(key)
            return None
        return entry

    def _add(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        if entry.binding.counted:
            self._sessions[entry.binding.account_id] += 1

    def _remove(self, key: str) -> _Entry | None:
        # Every removal goes through here, so the session counts never drift.
        entry = self._entries.pop(key, None)
        if entry is not None and entry.binding.counted:
            account_id = entry.binding.account_id
            self._sessions[account_id] -= 1
            if not self._sessions[account_id]:
                del self._sessions[account_id]
        return entry

    def _use(self, key: str, entry: _Entry, now: float) -> None:
        entry.last_used = now
        self._entries.move_to_end(key)

    def _prune(self, now: float) -> int:
        removed = 0
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if not self._expired(entry, now):
                break
            self._remove(key)
            removed += 1
        return removed
