"""The shared store against a real Valkey/Redis server: keys, TTLs, races, outages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.bindings import Binding
from responses_ws_bridge.local.state_server import StateServer
from responses_ws_bridge.state.fingerprint import fingerprint
from responses_ws_bridge.state.guarded import GuardedStore, StateUnavailable
from responses_ws_bridge.state.memory import MemoryStateStore
from responses_ws_bridge.state.redis_store import CLIENT_ERRORS, RedisStateStore, connect
from responses_ws_bridge.state.store import BindingLimits
from responses_ws_bridge.state.store_health import Backoff

from tests.support.state import Clock, run

HARD = AffinityKind.HARD
SOFT = AffinityKind.SOFT
SESSION = "session:0195c1d2-secret-session-id"
RESPONSE = "resp_68a0c0ffee"


def test_only_fingerprints_are_stored(state_server: StateServer) -> None:
    async def main() -> None:
        store = RedisStateStore(connect(state_server.url), "pool-a")
        try:
            await store.bind(SESSION, Binding("acct-1", HARD, counted=True))
            await store.bind("prompt-cache:cache-key-xyz", Binding("acct-1", SOFT, counted=True))
            await store.set_response_owner(RESPONSE, "acct-1")
            await store.acquire_lease("acct-1", 60)
            await store.cool_down("acct-1", 2e9, "HTTP 429")
            client = store.client
            keys = [str(k) async for k in client.scan_iter(match="*")]
            dumped = " ".join(keys)
            for key in keys:
                kind = await client.type(key)
                if kind == "string":
                    dumped += " " + str(await client.get(key))
                elif kind == "hash":
                    dumped += " " + str(await client.hgetall(key))
                elif kind == "zset":
                    dumped += " " + str(await client.zrange(key, 0, -1))
            for secret in ("0195c1d2", "secret-session", "cache-key-xyz", "68a0c0ffee"):
                assert secret not in dumped
            salt = await store.salt()
            assert f"pool-a:bind:{fingerprint(salt, SESSION)}" in keys
            assert all(k.startswith("pool-a:") for k in keys)
        finally:
            await store.close()

    run(main)


def test_namespaces_share_a_server_without_seeing_each_other(state_server: StateServer) -> None:
    async def main() -> None:
        a = RedisStateStore(connect(state_server.url), "pool-a")
        b = RedisStateStore(connect(state_server.url), "pool-b")
        try:
            await a.bind(SESSION, Binding("a1", HARD))
            await a.cool_down("shared-id", 2e9, "HTTP 429")
            assert await b.binding(SESSION) is None
            assert await b.bind(SESSION, Binding("b1", HARD)) == Binding("b1", HARD)
            assert (await b.health(["shared-id"]))["shared-id"].cooldown_until is None
            # Same key, different salt per namespace: unrelated fingerprints.
            assert fingerprint(await a.salt(), SESSION) != fingerprint(await b.salt(), SESSION)
        finally:
            await a.close()
            await b.close()

    run(main)


def test_ttls_follow_the_limits_and_reads_restart_them(state_server: StateServer) -> None:
    limits = BindingLimits(hard_ttl_s=100, soft_ttl_s=10, owner_ttl_s=50)

    async def main() -> None:
        store = RedisStateStore(connect(state_server.url), "ns", limits)
        try:
            client = store.client
            salt = await store.salt()
            await store.bind(SESSION, Binding("a", HARD))
            await store.bind("prompt-cache:p", Binding("a", SOFT))
            await store.set_response_owner(RESPONSE, "a")
            hard_ms = await client.pttl(f"ns:bind:{fingerprint(salt, SESSION)}")
            soft_key = f"ns:bind:{fingerprint(salt, 'prompt-cache:p')}"
            owner_ms = await client.pttl(f"ns:resp:{fingerprint(salt, RESPONSE)}")
            assert 90_000 < hard_ms <= 100_000
            assert 0 < await client.pttl(soft_key) <= 10_000
            assert 40_000 < owner_ms <= 50_000
            await client.pexpire(soft_key, 1_000)
            await store.binding("prompt-cache:p")  # a use: the idle TTL starts again
            assert await client.pttl(soft_key) > 5_000
        finally:
            await store.close()

    run(main)


def test_no_ttl_when_limits_say_inf(state_server: StateServer) -> None:
    async def main() -> None:
        limits = BindingLimits(hard_ttl_s=float("inf"))
        store = RedisStateStore(connect(state_server.url), "ns", limits)
        try:
            await store.bind(SESSION, Binding("a", HARD))
            key = f"ns:bind:{fingerprint(await store.salt(), SESSION)}"
            assert await store.client.pttl(key) == -1
        finally:
            await store.close()

    run(main)


def test_a_bound_session_stops_counting_when_its_binding_expires(
    state_server: StateServer,
) -> None:
    async def main() -> None:
        store = RedisStateStore(connect(state_server.url), "ns", BindingLimits(soft_ttl_s=0.05))
        try:
            await store.bind("prompt-cache:p", Binding("a", SOFT, counted=True))
            await store.bind(SESSION, Binding("a", HARD, counted=True))
            assert await store.bound_sessions(["a"]) == {"a": 2}
            await asyncio.sleep(0.15)
            assert await store.bound_sessions(["a"]) == {"a": 1}
            assert await store.client.zcard("ns:sessions:a") == 1  # trimmed, not just skipped
        finally:
            await store.close()

    run(main)


def test_a_session_kept_alive_by_use_counts_past_its_first_expiry(
    state_server: StateServer,
) -> None:
    async def main() -> None:
        store = RedisStateStore(connect(state_server.url), "ns")
        try:
            client = store.client
            salt = await store.salt()
            await store.bind("session:used", Binding("a", HARD, counted=True))
            await store.bind("session:gone", Binding("a", HARD, counted=True))
            await store.bind("session:moved", Binding("a", HARD, counted=True))
            # As if their first expiry had passed: "used" was read meanwhile (its TTL
            # restarted), "gone" expired, "moved" was bound again elsewhere.
            fps = {k: fingerprint(salt, f"session:{k}") for k in ("used", "gone", "moved")}
            await client.zadd("ns:sessions:a", {fp: 0 for fp in fps.values()})
            await client.delete(f"ns:bind:{fps['gone']}")
            await client.set(f"ns:bind:{fps['moved']}", '["hard", "b"]')
            assert await store.bound_sessions(["a"]) == {"a": 1}
            score = await client.zscore("ns:sessions:a", fps["used"])
            assert score is not None and score > 1e12  # scored again by its TTL (ms)
        finally:
            await store.close()

    run(main)


def test_racing_binders_on_two_clients_end_with_one_owner(state_server: StateServer) -> None:
    async def main() -> None:
        one = RedisStateStore(connect(state_server.url), "ns")
        two = RedisStateStore(connect(state_server.url), "ns")
        try:
            for round_ in range(5):
                key = f"session:race-{round_}"
                results = await asyncio.gather(
                    *(
                        (one if i % 2 else two).bind(key, Binding(f"acct-{i}", HARD))
                        for i in range(40)
                    )
                )
                owners = {r.account_id for r in results}
                assert len(owners) == 1
                assert await one.binding(key) == await two.binding(key) == results[0]
        finally:
            await one.close()
            await two.close()

    run(main)


def test_a_dead_instance_lease_stops_counting(state_server: StateServer) -> None:
    clock = Clock()

    async def main() -> None:
        dead = RedisStateStore(connect(state_server.url), "ns", clock=clock)
        alive = RedisStateStore(connect(state_server.url), "ns", clock=clock)
        try:
            await dead.acquire_lease("a", 30)
            kept = await alive.acquire_lease("a", 30)
            await dead.close()  # this instance is gone: it will never release
            assert await alive.in_flight(["a"]) == {"a": 2}
            clock.advance(20)
            kept = await alive.renew_lease(kept, 30) or kept
            clock.advance(20)
            assert await alive.in_flight(["a"]) == {"a": 1}
        finally:
            await alive.close()

    run(main)


def _guarded(url: str, clock: Clock, errors: list[tuple[str, str]]) -> GuardedStore:
    return GuardedStore(
        RedisStateStore(connect(url, timeout_s=0.3), "ns"),
        timeout_s=0.3,
        backoff=Backoff(base_s=1.0, max_s=8.0, jitter_fraction=0.0),
        clock=clock,
        jitter=lambda: 0.0,
        on_error=lambda op, kind: errors.append((op, kind)),
        errors=CLIENT_ERRORS,
    )


def test_killed_store_answers_unavailable_then_recovers(
    state_server: StateServer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(0.0)
    errors: list[tuple[str, str]] = []

    async def main() -> None:
        guarded = _guarded(state_server.url, clock, errors)
        try:
            bound = await guarded.run("bind", lambda s: s.bind(SESSION, Binding("a", HARD)))
            assert bound == Binding("a", HARD)
            state_server.kill()
            for _ in range(5):
                got = await guarded.run("binding", lambda s: s.binding(SESSION))
                assert isinstance(got, StateUnavailable)
            assert len(errors) == 1  # the rest were answered at once, during the backoff
            clock.advance(1.0)
            assert isinstance(
                await guarded.run("binding", lambda s: s.binding(SESSION)), StateUnavailable
            )
            assert len(errors) == 2
            state_server.start()  # same port, empty: a crashed store coming back
            clock.advance(2.0)
            rebound = await guarded.run("bind", lambda s: s.bind(SESSION, Binding("b", HARD)))
            assert rebound == Binding("b", HARD)
            assert guarded.available
        finally:
            await guarded.close()

    with caplog.at_level(logging.WARNING, logger="responses_ws_bridge.state.guarded"):
        run(main)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1
    assert not any("0195c1d2" in m for m in messages)


def test_stalled_store_times_out(state_server: StateServer) -> None:
    clock = Clock(0.0)
    errors: list[tuple[str, str]] = []

    async def main() -> None:
        guarded = _guarded(state_server.url, clock, errors)
        try:
            assert await guarded.run("binding", lambda s: s.binding(SESSION)) is None
            state_server.pause()
            try:
                got = await guarded.run("binding", lambda s: s.binding(SESSION))
            finally:
                state_server.resume()
            assert isinstance(got, StateUnavailable)
            assert errors and errors[0][0] == "binding"
        finally:
            await guarded.close()

    run(main)


async def _once_more[T](call: Callable[[], Awaitable[T]]) -> T:
    """The first call after a restart meets the dead connection; the next one reconnects."""
    try:
        return await call()
    except CLIENT_ERRORS:
        return await call()


def test_a_store_that_lost_its_data_takes_reoffers_before_new_bindings(
    state_server: StateServer,
) -> None:
    async def main() -> None:
        alpha = RedisStateStore(connect(state_server.url), "pool", recovery_grace_s=1.0)
        bravo = RedisStateStore(connect(state_server.url), "pool", recovery_grace_s=1.0)
        try:
            assert await alpha.bind_new(SESSION, Binding("acct-1", HARD)) is not None
            assert await bravo.check_epoch() is False  # a fresh store: no grace
            assert await bravo.take_refresh_lock("acct-1", 5.0) is not None
            state_server.kill()
            state_server.start()
            # Bravo never knew the session: a new binding waits while the store recovers.
            refused = await _once_more(lambda: bravo.bind_new(SESSION, Binding("acct-2", HARD)))
            assert refused is None
            lock = await bravo.take_refresh_lock("acct-1", 5.0)
            assert lock.fence is None
            # Alpha notices and re-offers what it knows; bravo then finds alpha's owner.
            assert await _once_more(alpha.check_epoch) is True
            await alpha.bind(SESSION, Binding("acct-1", HARD))
            found = await bravo.bind_new(SESSION, Binding("acct-2", HARD))
            assert found is not None and found.account_id == "acct-1"
            assert await bravo.bind_new("session:brand-new", Binding("acct-2", HARD)) is None
            await asyncio.sleep(1.1)  # the grace period is over
            fresh = await bravo.bind_new("session:brand-new", Binding("acct-2", HARD))
            assert fresh is not None and fresh.account_id == "acct-2"
            assert (await bravo.take_refresh_lock("acct-1", 5.0)).fence is not None
        finally:
            await alpha.close()
            await bravo.close()

    run(main)


def test_an_instance_that_missed_the_restart_is_refused_a_new_binding(
    state_server: StateServer,
) -> None:
    """Its cached salt is the old one: the script sees it and the store starts recovering."""

    async def main() -> None:
        alpha = RedisStateStore(connect(state_server.url), "pool", recovery_grace_s=1.0)
        try:
            await alpha.bind(SESSION, Binding("acct-1", HARD))
            await state_server_flush(alpha)
            assert await alpha.bind_new("session:other", Binding("acct-1", HARD)) is None
            assert await alpha.client.exists("pool:recovering") == 1
        finally:
            await alpha.close()

    run(main)


async def state_server_flush(store: RedisStateStore) -> None:
    """The store losing its data without the connection breaking (FLUSHALL)."""
    await store.client.flushall()


class _ClosingStore(MemoryStateStore):
    """A store whose calls fail once it is being closed, as a client's pool does."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    async def binding(self, key: str) -> Binding | None:
        if self.closed:
            raise ConnectionError("Connection closed by server.")
        return await super().binding(key)

    async def close(self) -> None:
        self.closed = True


def test_a_call_that_fails_because_the_store_is_closing_is_not_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    errors: list[tuple[str, str]] = []

    async def main() -> None:
        guarded = GuardedStore(_ClosingStore(), on_error=lambda op, kind: errors.append((op, kind)))
        await guarded.close()
        got = await guarded.run("binding", lambda s: s.binding(SESSION))
        assert isinstance(got, StateUnavailable)
        assert guarded.available

    run(main)
    assert errors == []
    assert "unavailable" not in caplog.text
