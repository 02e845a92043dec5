"""The state-store contract, run against the in-memory store and a real Valkey/Redis server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.bindings import Binding
from responses_ws_bridge.local.state_server import StateServer
from responses_ws_bridge.state.guarded import GuardedStore, StateUnavailable
from responses_ws_bridge.state.leases import held_lease
from responses_ws_bridge.state.memory import MemoryStateStore
from responses_ws_bridge.state.redis_store import CLIENT_ERRORS, RedisStateStore, connect
from responses_ws_bridge.state.store import BindingLimits, StateStore, TokenRecord

from tests.support.state import Clock, run

HARD = AffinityKind.HARD
SOFT = AffinityKind.SOFT

Opener = Callable[[Clock], AbstractAsyncContextManager[StateStore]]


@pytest.fixture(params=["memory", "redis"])
def open_store(request: pytest.FixtureRequest) -> Iterator[Opener]:
    if request.param == "memory":

        @asynccontextmanager
        async def memory(clock: Clock) -> AsyncIterator[StateStore]:
            yield MemoryStateStore(BindingLimits(max_entries=100), clock=clock)

        yield memory
        return
    with StateServer() as server:

        @asynccontextmanager
        async def shared(clock: Clock) -> AsyncIterator[StateStore]:
            store = RedisStateStore(connect(server.url), "test", clock=clock)
            try:
                yield store
            finally:
                await store.close()

        yield shared


def check(
    open_store: Opener, body: Callable[[StateStore, Clock], Coroutine[Any, Any, None]]
) -> None:
    async def main() -> None:
        clock = Clock()
        async with open_store(clock) as store:
            await body(store, clock)

    run(main)


def test_first_binder_owns_a_key(open_store: Opener) -> None:
    async def body(store: StateStore, clock: Clock) -> None:
        assert await store.binding("session:s1") is None
        assert await store.bind("session:s1", Binding("a", HARD)) == Binding("a", HARD)
        assert await store.bind("session:s1", Binding("b", HARD)) == Binding("a", HARD)
        assert await store.binding("session:s1") == Binding("a", HARD)

    check(open_store, body)


def test_rebind_moves_a_soft_key_and_forget_drops_it(open_store: Opener) -> None:
    async def body(store: StateStore, clock: Clock) -> None:
        await store.bind("prompt-cache:p", Binding("a", SOFT))
        await store.rebind("prompt-cache:p", Binding("b", SOFT))
        assert await store.binding("prompt-cache:p") == Binding("b", SOFT)
        assert await store.forget("prompt-cache:p") is True
        assert await store.forget("prompt-cache:p") is False
        assert await store.binding("prompt-cache:p") is None

    check(open_store, body)


def test_lookup_reads_the_response_owner_and_every_key(open_store: Opener) -> None:
    async def body(store: StateStore, clock: Clock) -> None:
        await store.set_response_owner("resp_1", "b")
        await store.bind("session:s", Binding("a", HARD))
        found = await store.lookup("resp_1", ["session:s", "thread:t"])
        assert found.response_owner == "b"
        assert dict(found.bindings) == {"session:s": Binding("a", HARD)}
        assert (await store.lookup("resp_other", [])).response_owner is None
        assert await store.response_owner("resp_1") == "b"

    check(open_store, body)


def test_forget_account_drops_its_bindings_and_responses(open_store: Opener) -> None:
    async def body(store: StateStore, clock: Clock) -> None:
        await store.bind("session:1", Binding("gone", HARD))
        await store.bind("prompt-cache:2", Binding("gone", SOFT))
        await store.bind("session:3", Binding("stays", HARD))
        await store.set_response_owner("resp_1", "gone")
        assert await store.forget_account("gone") == 3
        assert await store.binding("session:1") is None
        assert await store.binding("session:3") == Binding("stays", HARD)
        assert await store.response_owner("resp_1") is None

    check(open_store, body)


def test_bound_sessions_count_the_counted_bindings_per_account(open_store: Opener) -> None:
    async def body(store: StateStore, clock: Clock) -> None:
        assert await store.bound_sessions(["a", "b"]) == {"a": 0, "b": 0}
        await store.bind("session:1", Binding("a", HARD, counted=True))
        await store.bind("thread:1", Binding("a", HARD))  # the same session's other key
        await store.bind("session:2", Binding("a", HARD, counted=True))
        await store.bind("prompt-cache:p", Binding("a", SOFT, counted=True))
        # Another instance binding a key already bound counts nothing more.
        in_force = await store.bind("session:2", Binding("b", HARD, counted=True))
        assert in_force.account_id == "a"
        assert await store.bound_sessions(["a", "b"]) == {"a": 3, "b": 0}
        await store.rebind("prompt-cache:p", Binding("b", SOFT, counted=True))  # moved
        assert await store.bound_sessions(["a", "b"]) == {"a": 2, "b": 1}
        assert await store.forget("session:1") is True
        assert await store.forget("thread:1") is True
        assert await store.bound_sessions(["a", "b"]) == {"a": 1, "b": 1}
        await store.forget_account("a")
        assert await store.bound_sessions(["a", "b"]) == {"a": 0, "b": 1}
        assert await store.bound_sessions([]) == {}

    check(open_store, body)


def test_cooldown_is_never_shortened_and_success_ends_it(open_store: Opener) -> None:
    async def body(store: StateStore, clock: Clock) -> None:
        now = clock()
        assert await store.cool_down("a", now + 60, "HTTP 429") == now + 60
        assert await store.cool_down("a", now + 10, "shorter") == now + 60
        record = (await store.health(["a"]))["a"]
        assert (record.cooldown_until, record.cooldown_reason) == (now + 60, "HTTP 429")
        await store.clear_failures("a")
        record = (await store.health(["a"]))["a"]
        assert record.cooldown_until is None

    check(open_store, body)


def test_disabled_survives_success_until_enabled(open_store: Opener) -> None:
    async def body(store: StateStore, clock: Clock) -> None:
        await store.disable("a", "HTTP 401")
        await store.clear_failures("a")
        assert (await store.health(["a"]))["a"].disabled == "HTTP 401"
        await store.enable("a")
        assert (await store.health(["a", "b"]))["a"].disabled is None

    check(open_store, body)


def test_a_success_ends_a_cooldown_but_not_a_disablement(open_store: Opener) -> None:
    async def body(store: StateStore, clock: Clock) -> None:
        await store.cool_down("a", clock() + 60, "HTTP 429")
        await store.disable("b", "HTTP 401")
        await store.cool_down("b", clock() + 60, "HTTP 429")
        await store.clear_failures("a")
        await store.clear_failures("b")
        records = await store.health(["a", "b"])
        assert (records["a"].cooldown_until, records["a"].cooldown_reason) == (None, "")
        assert records["b"].disabled == "HTTP 401" and records["b"].cooldown_until is None

    check(open_store, body)


def test_rate_limits_are_the_latest_figures(open_store: Opener) -> None:
    async def body(store: StateStore, clock: Clock) -> None:
        await store.set_rate_limits("a", {"primary.used_percent": 10.0})
        await store.set_rate_limits(
            "a", {"primary.used_percent": 42.5, "secondary.used_percent": 3}
        )
        figures = (await store.health(["a"]))["a"].rate_limits
        assert dict(figures) == {"primary.used_percent": 42.5, "secondary.used_percent": 3.0}

    check(open_store, body)


def test_leases_count_until_released_or_expired(open_store: Opener) -> None:
    async def body(store: StateStore, clock: Clock) -> None:
        first = await store.acquire_lease("a", 60)
        second = await store.acquire_lease("a", 60)
        assert await store.in_flight(["a", "b"]) == {"a": 2, "b": 0}
        await store.release_lease(first)
        assert await store.in_flight(["a"]) == {"a": 1}
        clock.advance(59)
        renewed = await store.renew_lease(second, 60)
        assert renewed is not None and renewed.expires_at == clock() + 60
        clock.advance(59)
        assert await store.in_flight(["a"]) == {"a": 1}
        clock.advance(2)  # not renewed: an instance that died holds it no longer
        assert await store.in_flight(["a"]) == {"a": 0}
        assert await store.renew_lease(renewed, 60) is None

    check(open_store, body)


def test_memory_bindings_expire_when_idle_and_are_bounded() -> None:
    async def main() -> None:
        clock = Clock()
        limits = BindingLimits(hard_ttl_s=100, soft_ttl_s=10, max_entries=2)
        store = MemoryStateStore(limits, clock=clock)
        await store.bind("session:1", Binding("a", HARD))
        await store.bind("prompt-cache:p", Binding("a", SOFT))
        clock.advance(11)
        assert await store.binding("prompt-cache:p") is None  # soft TTL
        assert await store.binding("session:1") == Binding("a", HARD)
        await store.bind("session:2", Binding("a", HARD))
        await store.bind("session:3", Binding("a", HARD))  # past max_entries: LRU goes
        assert await store.binding("session:1") is None
        assert [row.key for row in store.binding_rows()] == ["session:2", "session:3"]

    run(main)


def test_memory_bound_sessions_expire_with_their_bindings() -> None:
    async def main() -> None:
        clock = Clock()
        store = MemoryStateStore(BindingLimits(hard_ttl_s=100, soft_ttl_s=10), clock=clock)
        await store.bind("session:1", Binding("a", HARD, counted=True))
        await store.bind("prompt-cache:p", Binding("a", SOFT, counted=True))
        assert await store.bound_sessions(["a"]) == {"a": 2}
        clock.advance(11)
        assert await store.bound_sessions(["a"]) == {"a": 1}  # soft TTL
        clock.advance(80)
        await store.binding("session:1")  # a use: alive for another 100 s
        clock.advance(80)
        assert await store.bound_sessions(["a"]) == {"a": 1}
        clock.advance(21)
        assert await store.bound_sessions(["a"]) == {"a": 0}

    run(main)


def test_held_lease_counts_while_held() -> None:
    async def main() -> None:
        store = MemoryStateStore()
        guarded = GuardedStore(store)
        async with held_lease(guarded, "a") as lease:
            assert lease is not None
            assert await store.in_flight(["a"]) == {"a": 1}
        assert await store.in_flight(["a"]) == {"a": 0}

    run(main)


def test_held_lease_goes_ahead_without_a_store(state_server: StateServer) -> None:
    async def main() -> None:
        guarded = GuardedStore(
            RedisStateStore(connect(state_server.url, timeout_s=0.3), "ns"),
            timeout_s=0.3,
            errors=CLIENT_ERRORS,
        )
        state_server.kill()
        try:
            async with held_lease(guarded, "a") as lease:
                assert lease is None
        finally:
            await guarded.close()

    run(main)


def test_the_refresh_lock_is_set_if_absent_fenced_and_leased(open_store: Opener) -> None:
    async def body(store: StateStore, clock: Clock) -> None:
        first = await store.take_refresh_lock("r", 0.3)
        assert first.fence is not None
        held = await store.take_refresh_lock("r", 0.3)
        assert held.fence is None and 0 < held.ttl_s <= 0.3
        record = TokenRecord(1, first.fence, "sealed-1")
        assert await store.write_tokens("r", record, base_generation=None, fence=first.fence)
        view = await store.token_view("r")
        assert view.locked and view.record == record
        # "Nothing stored" is wrong now; another holder's release is not this one's.
        assert not await store.write_tokens("r", record, base_generation=None, fence=first.fence)
        await store.release_refresh_lock("r", first.fence + 100)
        assert (await store.token_view("r")).locked
        await store.release_refresh_lock("r", first.fence)
        assert not (await store.token_view("r")).locked
        second = await store.take_refresh_lock("r", 0.3)
        assert second.fence is not None and second.fence > first.fence
        newer = TokenRecord(2, second.fence, "sealed-2", retry_at=5.0, failures=1, last_failure="x")
        assert await store.write_tokens("r", newer, base_generation=1, fence=second.fence)
        # The first holder, stalled past its lease: fenced off, and on an old generation.
        stale = TokenRecord(2, first.fence, "stale")
        assert not await store.write_tokens("r", stale, base_generation=2, fence=first.fence)
        assert not await store.write_tokens("r", stale, base_generation=1, fence=second.fence)
        assert (await store.token_view("r")).record == newer
        # An expired lease frees the lock (the holder died): the next fence is higher still.
        clock.advance(1.0)
        await asyncio.sleep(0.35)
        third = await store.take_refresh_lock("r", 0.3)
        assert third.fence is not None and third.fence > second.fence
        assert (await store.token_view("other")).record is None

    check(open_store, body)


class _Down(MemoryStateStore):
    down = True

    async def check_epoch(self) -> bool:
        if self.down:
            raise OSError("connection refused")
        return False


def test_a_watchers_probe_ends_an_outage_but_never_prolongs_it() -> None:
    async def main() -> None:
        clock = Clock()
        store = _Down(clock=clock)
        errors: list[tuple[str, str]] = []
        guarded = GuardedStore(store, clock=clock, on_error=lambda *e: errors.append(e))
        await guarded.run("check_epoch", lambda s: s.check_epoch())
        assert not guarded.available and len(errors) == 1
        before = guarded.health
        for _ in range(5):
            assert isinstance(
                await guarded.probe("check_epoch", lambda s: s.check_epoch()), StateUnavailable
            )
        assert guarded.health == before and len(errors) == 1
        store.down = False
        assert await guarded.probe("check_epoch", lambda s: s.check_epoch()) is False
        assert guarded.available

    run(main)
