"""The bounded binding store: LRU bound, idle expiry, account removal."""

from __future__ import annotations

import pytest
from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.bindings import Binding, BindingRow, BindingStore, MemoryBindingStore


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


A = Binding("team-a", AffinityKind.HARD)
B = Binding("team-b", AffinityKind.SOFT)


def store(clock: Clock, *, max_entries: int = 10, ttl: float = 60.0) -> MemoryBindingStore:
    return MemoryBindingStore(max_entries=max_entries, idle_ttl_s=ttl, clock=clock)


def test_is_a_binding_store() -> None:
    s: BindingStore = store(Clock())  # checked by mypy against the Protocol
    s.set("session:1", A)
    assert s.get("session:1") == A


def test_set_get_overwrite_delete() -> None:
    s = store(Clock())
    assert s.get("k") is None
    s.set("k", A)
    assert s.get("k") == A
    assert "k" in s
    s.set("k", B)  # a soft key moving to another account rebinds
    assert s.get("k") == B
    assert s.delete("k") is True
    assert s.delete("k") is False
    assert s.get("k") is None
    assert len(s) == 0


def test_idle_entries_expire() -> None:
    clock = Clock()
    s = store(clock, ttl=60.0)
    s.set("k", A)
    clock.now += 60.0
    assert s.get("k") == A  # exactly the TTL idle: still alive, and now used again
    clock.now += 60.0
    assert s.touch("k") is True
    clock.now += 60.5
    assert s.get("k") is None
    assert s.touch("k") is False
    assert "k" not in s


def test_use_keeps_an_entry_alive_and_expired_ones_are_pruned() -> None:
    clock = Clock()
    s = store(clock, ttl=10.0)
    s.set("old", A)
    s.set("used", B)
    clock.now += 8
    assert s.get("used") == B
    clock.now += 8
    assert [row.key for row in s.items()] == ["used"]
    assert len(s) == 1
    clock.now += 11
    assert s.prune() == 1
    assert s.items() == []


def test_count_bound_evicts_least_recently_used() -> None:
    clock = Clock()
    s = store(clock, max_entries=3)
    for key in ("k1", "k2", "k3"):
        s.set(key, A)
        clock.now += 1
    assert s.get("k1") == A  # k1 is now the most recently used
    clock.now += 1
    s.set("k4", B)
    assert [row.key for row in s.items()] == ["k3", "k1", "k4"]
    assert s.get("k2") is None
    s.touch("k3")
    s.set("k5", A)
    assert [row.key for row in s.items()] == ["k4", "k3", "k5"]
    assert len(s) == 3


def test_items_report_last_use() -> None:
    clock = Clock(500.0)
    s = store(clock)
    s.set("a", A)
    clock.now = 510.0
    s.set("b", B)
    clock.now = 520.0
    s.touch("a")
    assert s.items() == [BindingRow("b", B, 510.0), BindingRow("a", A, 520.0)]


def test_remove_account_drops_every_binding_to_it() -> None:
    s = store(Clock())
    s.set("session:1", A)
    s.set("prompt-cache:2", B)
    s.set("session:3", Binding("team-a", AffinityKind.SOFT))
    s.set("resp_1", A)
    assert s.remove_account("team-a") == 3
    assert [row.key for row in s.items()] == ["prompt-cache:2"]
    assert s.remove_account("team-a") == 0
    assert s.remove_account("nobody") == 0


@pytest.mark.parametrize(("max_entries", "ttl"), [(0, 10.0), (-1, 10.0), (1, 0.0), (1, -5.0)])
def test_rejects_bad_bounds(max_entries: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        MemoryBindingStore(max_entries=max_entries, idle_ttl_s=ttl, clock=Clock())


COUNTED_A = Binding("team-a", AffinityKind.HARD, counted=True)
COUNTED_B = Binding("team-b", AffinityKind.SOFT, counted=True)


def test_counted_bindings_are_counted_per_account() -> None:
    s = store(Clock())
    s.set("session:1", COUNTED_A)
    s.set("thread:1", A)  # the same session's other key: not counted
    s.set("session:2", COUNTED_A)
    s.set("prompt-cache:p", COUNTED_B)
    assert s.bound_sessions() == {"team-a": 2, "team-b": 1}
    s.set("session:2", COUNTED_B)  # moved
    assert s.bound_sessions() == {"team-a": 1, "team-b": 2}
    s.delete("session:1")
    assert s.bound_sessions() == {"team-b": 2}
    assert s.remove_account("team-b") == 2
    assert s.bound_sessions() == {}


def test_counts_follow_expiry_and_eviction() -> None:
    clock = Clock()
    s = store(clock, max_entries=2, ttl=60.0)
    s.set("session:1", COUNTED_A)
    clock.now += 40
    s.set("session:2", COUNTED_A)
    s.set("session:3", COUNTED_B)  # past max_entries: session:1 is evicted
    assert s.bound_sessions() == {"team-a": 1, "team-b": 1}
    clock.now += 30
    assert s.get("session:3") == COUNTED_B  # a use: alive for another 60 s
    clock.now += 40  # session:2 idle for 70 s
    assert s.bound_sessions() == {"team-b": 1}
    clock.now += 61
    assert s.get("session:3") is None
    assert s.bound_sessions() == {}
