"""Two services sharing one real Valkey store, in one event loop, against a real upstream.

Each "instance" is a `BridgeService` with its own `PoolState` (its own memory)
and its own `SharedState` on one namespace of one store. Their accounts files
list the accounts in opposite orders, so that left alone each would choose a
different account for a new request: whatever agrees across them came from
the store.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from responses_ws_bridge.addons.metrics import pool_gauges
from responses_ws_bridge.core.accounts import parse_accounts
from responses_ws_bridge.core.affinity import AffinityKind, classify
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.turns import Turn
from responses_ws_bridge.local.response_events import rate_limit_event
from responses_ws_bridge.local.state_server import StateServer
from responses_ws_bridge.local.upstream import LocalUpstream, Plan
from responses_ws_bridge.shell.bridge_service import BridgeService, BridgeSettings
from responses_ws_bridge.shell.session_pool import SessionPool
from responses_ws_bridge.shell.shared_state import SharedState
from responses_ws_bridge.shell.upstream_client import UpstreamSettings
from responses_ws_bridge.state.fallback import FailClosed, Owned
from responses_ws_bridge.state.guarded import GuardedStore
from responses_ws_bridge.state.redis_store import CLIENT_ERRORS, RedisStateStore, connect

from tests.support.service import no_sleep, post_turn
from tests.support.state import run

TOKENS = {"tok-a": "a", "tok-b": "b", "tok-c": "c"}
BOUND_S = 10.0
STREAM = {"model": "m", "input": "Say hello", "stream": True}


@dataclass
class Instance:
    service: BridgeService
    state: PoolState
    shared: SharedState
    store: GuardedStore

    async def post(
        self, body: dict[str, Any], headers: list[tuple[str, str]] | None = None
    ) -> tuple[Turn, httpx.Response]:
        return await post_turn(self.service, body, headers)


@asynccontextmanager
async def instance(
    upstream: LocalUpstream, url: str, order: tuple[str, ...]
) -> AsyncIterator[Instance]:
    ws_url = upstream.http_url.replace("http://", "ws://") + "/v1/responses"
    state = PoolState()
    accounts = [{"id": i, "api_key": f"tok-{i}", "upstream": ws_url} for i in order]
    state.set_accounts(parse_accounts(json.dumps({"accounts": accounts})))
    store = GuardedStore(RedisStateStore(connect(url), "test"), errors=CLIENT_ERRORS)
    shared = SharedState(lambda: store, state)
    upstream_settings = UpstreamSettings(connect_timeout=BOUND_S, ping_interval=None)
    # Nothing made ahead: these tests count the upstream connections each request makes.
    settings = BridgeSettings(upstream=upstream_settings, preconnect=0)
    service = BridgeService(
        settings, state=state, sessions=SessionPool(), shared=shared, sleep=no_sleep
    )
    try:
        yield Instance(service, state, shared, store)
    finally:
        await service.shutdown()
        await store.close()


@asynccontextmanager
async def two_instances(
    server: StateServer,
) -> AsyncIterator[tuple[LocalUpstream, Instance, Instance]]:
    async with AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(LocalUpstream(tokens=TOKENS))
        one = await stack.enter_async_context(instance(upstream, server.url, ("a", "b")))
        two = await stack.enter_async_context(instance(upstream, server.url, ("b", "a")))
        yield upstream, one, two


def accounts_of(upstream: LocalUpstream) -> list[str | None]:
    return [r.account for r in upstream.records()]


def test_a_hard_session_bound_on_one_instance_reaches_its_owner_through_the_other(
    state_server: StateServer,
) -> None:
    async def main() -> None:
        async with two_instances(state_server) as (upstream, one, two):
            _, first = await one.post(STREAM, [("session-id", "s-1")])
            assert first.status_code == 200
            assert accounts_of(upstream) == ["a"]
            # Left alone, instance two would choose "b" (first in its file).
            turn, second = await two.post(STREAM, [("session-id", "s-1")])
            assert second.status_code == 200
            assert accounts_of(upstream) == ["a", "a"]
            assert turn.report.account == "a"

    run(main)


def test_previous_response_id_is_routed_to_its_owner_from_the_other_instance(
    state_server: StateServer,
) -> None:
    async def main() -> None:
        async with two_instances(state_server) as (upstream, one, two):
            turn, _ = await one.post({**STREAM, "prompt_cache_key": "k-1"})
            assert turn.report.account == "a"
            response_id = upstream.records()[0].response_ids[0]
            # Published before the terminal event reached the client, not after.
            owner = await two.store.run("owner", lambda s: s.response_owner(response_id))
            assert owner == "a"
            turn, response = await two.post({**STREAM, "previous_response_id": response_id})
            assert response.status_code == 200, response.content
            assert turn.report.account == "a"

    run(main)


def test_a_soft_key_follows_its_binding_across_instances(state_server: StateServer) -> None:
    async def main() -> None:
        async with two_instances(state_server) as (upstream, one, two):
            # Served by "b" after "a" fails with 1011: the soft key moves to "b".
            upstream.script(Plan(close_code=1011), account="a")
            turn, _ = await one.post({**STREAM, "prompt_cache_key": "k-2"})
            assert [a.account for a in turn.report.attempts] == ["a", "b"]
            turn, _ = await two.post({**STREAM, "prompt_cache_key": "k-2"})
            assert turn.report.account == "b"
            turn, _ = await one.post({**STREAM, "prompt_cache_key": "k-2"})
            assert turn.report.account == "b"

    run(main)


def test_a_cooldown_seen_by_one_instance_keeps_the_other_away(state_server: StateServer) -> None:
    async def main() -> None:
        async with two_instances(state_server) as (upstream, one, two):
            upstream.script(Plan(error=rate_limit_event(60)), account="b")
            turn, response = await two.post(STREAM)
            assert response.status_code == 200
            assert [a.account for a in turn.report.attempts] == ["b", "a"]
            upstream.reset()
            # Instance one never saw the 429, and would choose "a"; a hard session
            # new to it must not be bound to the cooling "b" either.
            for i in range(3):
                turn, response = await one.post(STREAM, [("session-id", f"cool-{i}")])
                assert response.status_code == 200
            turn, response = await two.post(STREAM)
            assert accounts_of(upstream) == ["a"] * 4

    run(main)


def test_a_hard_owner_cooling_on_another_instance_is_a_429_here(
    state_server: StateServer,
) -> None:
    async def main() -> None:
        async with two_instances(state_server) as (upstream, one, two):
            # A new hard key: bound to "a" before its first attempt, which is refused.
            upstream.script(Plan(error=rate_limit_event(30)), account="a")
            _, response = await one.post(STREAM, [("session-id", "s-429")])
            assert response.status_code == 429
            assert accounts_of(upstream) == ["a"]
            upstream.reset()
            _, response = await two.post(STREAM, [("session-id", "s-429")])
            assert response.status_code == 429
            assert int(response.headers["retry-after"]) > 20
            assert upstream.records() == []  # the owner is cooling; nobody else serves

    run(main)


def test_two_instances_claiming_one_new_hard_key_end_with_one_owner(
    state_server: StateServer,
) -> None:
    async def main() -> None:
        async with two_instances(state_server) as (_, one, two):
            affinity = classify([("session-id", "race-0")], {})
            # Both looked the key up and found no owner; each claims its own choice.
            claims = await asyncio.gather(
                one.shared.claim(affinity, "a"), two.shared.claim(affinity, "b")
            )
            assert claims[0] == claims[1]
            assert isinstance(claims[0], Owned)
            # The same race through whole requests, several keys at once.
            posts = [
                inst.post(STREAM, [("session-id", f"race-{i}")])
                for i in range(1, 6)
                for inst in (one, two)
            ]
            results = await asyncio.gather(*posts)
            assert all(response.status_code == 200 for _, response in results)
            for i in range(1, 6):
                key = f"session:race-{i}"
                owners = {t.report.account for t, _ in results if t.affinity.key == key}
                assert len(owners) == 1, (key, owners)
                assert one.state.owner(classify([("session-id", f"race-{i}")], {})) in owners

    run(main)


def test_load_is_every_instances_leases(state_server: StateServer) -> None:
    async def main() -> None:
        async with two_instances(state_server) as (upstream, one, two):
            await one.post(STREAM, [("session-id", "busy")])  # bound to "a"
            upstream.script(Plan(pace_s=0.05))
            slow = asyncio.ensure_future(two.post(STREAM, [("session-id", "busy")]))
            await upstream.wait_until(lambda recs: len(recs) == 2 and bool(recs[1].events), BOUND_S)
            assert await loads(two) == {"a": 1, "b": 0}
            # Instance one has nothing in flight and would choose "a", busy on instance two.
            turn, _ = await one.post(STREAM)
            assert turn.report.account == "b"
            await slow
            assert await loads(one) == {"a": 0, "b": 0}

    run(main)


def test_new_sessions_spread_by_every_instances_bound_sessions(
    state_server: StateServer,
) -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            upstream = await stack.enter_async_context(LocalUpstream(tokens=TOKENS))
            # One file order: left alone, each would bind its first session to "a", its
            # second to "b", and so on, two sessions a step on the same account.
            one = await stack.enter_async_context(
                instance(upstream, state_server.url, ("a", "b", "c"))
            )
            two = await stack.enter_async_context(
                instance(upstream, state_server.url, ("a", "b", "c"))
            )
            served = Counter({"a": 0, "b": 0, "c": 0})
            for n in range(30):
                inst = (one, two)[n % 2]
                turn, response = await inst.post(STREAM, [("session-id", f"new-{n}")])
                assert response.status_code == 200
                assert turn.report.account is not None
                served[turn.report.account] += 1
                # Within one at every step, not only at the end.
                assert max(served.values()) - min(served.values()) <= 1, (n, served)
            assert served == {"a": 10, "b": 10, "c": 10}
            # The counts both instances chose by are the store's, not their own; the
            # gauges show them as last read.
            assert await one.shared.read_sessions(["a", "b", "c"]) == served
            assert one.state.bound_sessions() != served
            gauges = pool_gauges(one.state, SessionPool(), one.shared)
            assert {g.id: g.bound_sessions for g in gauges.accounts} == served

    run(main)


async def loads(inst: Instance) -> dict[str, int] | None:
    assert inst.state.pool is not None
    return await inst.shared.refresh(inst.state.pool)


def test_with_the_store_down_only_known_owners_serve_hard_requests(
    state_server: StateServer,
) -> None:
    async def main() -> None:
        async with two_instances(state_server) as (_, one, two):
            _, response = await one.post(STREAM, [("session-id", "known")])
            assert response.status_code == 200
            state_server.kill()
            # The choice counts this instance's own sessions while the store is away.
            assert await one.shared.read_sessions(["a", "b"]) == {"a": 1}
            _, response = await two.post(STREAM)
            assert response.status_code == 200  # no affinity: local state serves
            _, response = await one.post(STREAM, [("session-id", "known")])
            assert response.status_code == 200  # this instance knows the owner
            turn, response = await two.post(STREAM, [("session-id", "known")])
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "state_store_unavailable"
            assert turn.report.attempts == []
            _, response = await one.post(STREAM, [("session-id", "new-one")])
            assert response.status_code == 503
            _, response = await one.post({**STREAM, "prompt_cache_key": "soft"})
            assert response.status_code == 200  # soft: local state

    run(main)


def test_claims_fail_closed_for_hard_keys_when_the_store_is_down(
    state_server: StateServer,
) -> None:
    async def main() -> None:
        async with two_instances(state_server) as (_, one, _two):
            state_server.kill()
            hard = classify([("session-id", "x")], {})
            soft = classify([], {"prompt_cache_key": "y"})
            assert isinstance(await one.shared.claim(hard, "a"), FailClosed)
            assert await one.shared.claim(soft, "a") == Owned("a", from_store=False)
            assert soft.kind is AffinityKind.SOFT

    run(main)


def test_an_accounts_reload_enables_everywhere_and_a_removed_account_is_forgotten(
    state_server: StateServer,
) -> None:
    async def main() -> None:
        async with two_instances(state_server) as (upstream, one, two):
            await one.post(STREAM, [("session-id", "on-a")])  # bound to "a"
            upstream.script(Plan(reject_status=401), account="b")
            turn, _ = await two.post(STREAM)
            assert [a.account for a in turn.report.attempts] == ["b", "a"]
            assert await health_words(one) == {"a": "healthy", "b": "disabled"}
            # The first load enables nothing; a reload does, for every instance.
            one.shared.accounts_changed(["a", "b"], [], reload=False)
            await one.shared.settle()
            assert await health_words(one) == {"a": "healthy", "b": "disabled"}
            two.shared.accounts_changed(["a", "b"], [], reload=True)
            await two.shared.settle()
            assert await health_words(one) == {"a": "healthy", "b": "healthy"}
            # "a" removed from the file: its bindings go, everywhere.
            two.shared.accounts_changed(["b"], ["a"], reload=True)
            await two.shared.settle()
            assert await one.store.run("read", lambda s: s.binding("session:on-a")) is None

    run(main)


async def health_words(inst: Instance) -> dict[str, str]:
    pool = inst.state.pool
    assert pool is not None
    await inst.shared.refresh(pool)
    return {row.id: row.health.split(":")[0] for row in pool.snapshot()}
