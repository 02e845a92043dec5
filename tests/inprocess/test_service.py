"""The service, relay, session pool and recorder in one event loop, against real sockets.

A real `LocalUpstream` (a `websockets` server on 127.0.0.1) plays the
upstream; a recording `ClientSink` (tests/support/sink.py) takes the answer as
mitmproxy's connection would. Only the retry backoff is skipped (an injected sleep).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from mitmproxy import hooks
from mitmproxy.proxy.layers.http import HttpRequestHook
from responses_ws_bridge.core.accounts import parse_accounts
from responses_ws_bridge.core.affinity import classify
from responses_ws_bridge.core.handshake_headers import UpstreamCredential
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.turns import CLIENT_GONE, Attempt, Turn
from responses_ws_bridge.local.response_events import (
    TurnSpec,
    rate_limit_event,
    rate_limits_event,
)
from responses_ws_bridge.local.upstream import LocalUpstream, Plan
from responses_ws_bridge.recording.recorder import HookEmitter, SessionFlowTap
from responses_ws_bridge.recording.session_flows import METADATA_KEY
from responses_ws_bridge.shell.bridge_service import BridgeService, BridgeSettings, TapFactory
from responses_ws_bridge.shell.session_pool import SessionPool
from responses_ws_bridge.shell.upstream_client import SessionTap, UpstreamSettings

from tests.support.service import no_sleep, post_turn
from tests.support.sink import RecordingSink

TOKENS = {"tok-a": "a", "tok-b": "b", "tok-c": "c"}
BOUND_S = 10.0


@dataclass
class Rig:
    upstream: LocalUpstream
    service: BridgeService
    state: PoolState

    async def post(
        self, body: dict[str, Any], headers: list[tuple[str, str]] | None = None
    ) -> tuple[Turn, httpx.Response]:
        """One client request through the service, as the addon would hand it over."""
        credential = None if self.state.pooled else UpstreamCredential("tok-a", None)
        return await post_turn(self.service, body, headers, client_credential=credential)


@asynccontextmanager
async def rig(
    *,
    pooled: bool = True,
    taps: TapFactory | None = None,
    preconnect: int = 0,
    accounts: tuple[str, ...] = ("a", "b"),
) -> AsyncIterator[Rig]:
    async with LocalUpstream(tokens=TOKENS) as upstream:
        ws_url = upstream.http_url.replace("http://", "ws://") + "/v1/responses"
        state = PoolState()
        if pooled:
            listed = [{"id": i, "api_key": f"tok-{i}", "upstream": ws_url} for i in accounts]
            state.set_accounts(parse_accounts(json.dumps({"accounts": listed})))
        settings = BridgeSettings(
            upstream_option="" if pooled else ws_url,
            upstream=UpstreamSettings(connect_timeout=BOUND_S, ping_interval=None),
            preconnect=preconnect,
        )
        sessions = SessionPool()
        service = BridgeService(settings, state=state, sessions=sessions, taps=taps, sleep=no_sleep)
        try:
            yield Rig(upstream, service, state)
        finally:
            await service.shutdown()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


STREAM = {"model": "m", "input": "Say hello", "stream": True}
SESSION = [("session-id", "s-1")]


def sse_types(body: bytes) -> list[str]:
    return [line[7:] for line in body.decode().splitlines() if line.startswith("event: ")]


def test_hard_1011_before_created_is_retried_on_the_owner_only() -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script(Plan(close_code=1011))
            turn, response = await r.post(STREAM, SESSION)
            assert response.status_code == 200
            assert sse_types(response.content)[-1] == "response.completed"
            accounts = [a.account for a in turn.report.attempts]
            assert len(set(accounts)) == 1 and len(accounts) == 2
            assert turn.report.attempts[0].close_code == 1011
            assert {rec.account for rec in r.upstream.records()} == {accounts[0]}

    run(main())


def test_soft_1011_moves_to_the_other_account() -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script(Plan(close_code=1011))
            turn, response = await r.post({**STREAM, "prompt_cache_key": "k"})
            assert response.status_code == 200
            first, second = (a.account for a in turn.report.attempts)
            assert first != second

    run(main())


def test_a_session_reuses_its_socket_for_the_next_turn() -> None:
    async def main() -> None:
        async with rig() as r:
            first, _ = await r.post(STREAM, SESSION)
            second, response = await r.post(STREAM, SESSION)
            assert response.status_code == 200
            assert not first.report.attempts[0].reused and second.report.attempts[0].reused
            assert len(r.upstream.records()) == 1
            assert r.service.sessions.idle_count == 1

    run(main())


def test_a_hard_owner_rate_limited_is_a_429_and_no_other_account_is_tried() -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script(Plan(error=rate_limit_event(30)), Plan(error=rate_limit_event(30)))
            turn, response = await r.post(STREAM, SESSION)
            assert response.status_code == 429
            assert response.headers["retry-after"] == "30"
            assert len({a.account for a in turn.report.attempts}) == 1

    run(main())


def test_a_client_that_did_not_ask_to_stream_gets_one_json_body() -> None:
    async def main() -> None:
        async with rig() as r:
            _, response = await r.post({"model": "m", "input": "Say hello"})
            assert response.headers["content-type"] == "application/json"
            assert response.json()["status"] == "completed"

    run(main())


def test_pass_through_keeps_the_upstream_verdict() -> None:
    async def main() -> None:
        async with rig(pooled=False) as r:
            r.upstream.script(Plan(reject_status=401))
            turn, response = await r.post(STREAM)
            assert response.status_code == 401
            assert turn.report.attempts[0].outcome == "rejected"

    run(main())


def test_after_events_a_close_ends_the_stream_with_stream_incomplete() -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script(Plan(close_code=1011, close_after_events=3))
            turn, response = await r.post(STREAM, SESSION)
            assert sse_types(response.content)[-1] == "response.failed"
            assert b"stream_incomplete" in response.content
            assert turn.report.outcome == "stream_incomplete"
            assert len(turn.report.attempts) == 1

    run(main())


def test_a_removed_account_is_not_bound_again_when_its_turn_ends() -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script(Plan(pace_s=0.05))
            task = asyncio.ensure_future(r.post(STREAM, SESSION))
            await r.upstream.wait_until(lambda records: any(x.events for x in records), BOUND_S)
            owner = r.upstream.records()[0].account
            keep = next(a for a in ("a", "b") if a != owner)
            config = {"accounts": [{"id": keep, "api_key": f"tok-{keep}"}]}
            r.service.accounts_removed(r.state.set_accounts(parse_accounts(json.dumps(config))))
            await task
            assert r.state.bindings.get("session:s-1") is None
            assert r.service.sessions.idle_count == 0  # its socket closed, not kept

    run(main())


class Hooks:
    def __init__(self) -> None:
        self.seen: list[hooks.Hook] = []

    async def __call__(self, hook: hooks.Hook) -> None:
        self.seen.append(hook)


def test_the_recorder_builds_the_session_flow_through_mitmproxy_hooks() -> None:
    collected = Hooks()
    taps: list[SessionFlowTap] = []

    async def main() -> None:
        emitter = HookEmitter(collected)

        def tap_for(turn: Turn, attempt: Attempt) -> SessionTap | None:
            tap = SessionFlowTap(
                turn=turn, attempt=attempt, emit=emitter, redact=True, secrets=["tok-a", "tok-b"]
            )
            taps.append(tap)
            return tap

        async with rig(taps=tap_for) as r:
            first, _ = await r.post(STREAM, SESSION)
            second, _ = await r.post(STREAM, SESSION)
        await emitter.drain()
        assert len(taps) == 1  # the second turn reused the socket
        names = [h.name for h in collected.seen]
        assert names[:5] == [
            "requestheaders",
            "request",
            "responseheaders",
            "response",
            "websocket_start",
        ]
        assert "error" not in names
        # One flow per turn on the socket; the close at shutdown is the last turn's, no flow
        # of its own.
        flows = [h.flow for h in collected.seen if isinstance(h, HttpRequestHook)]
        assert len(flows) == 2
        closing = flows[1].websocket
        assert closing is not None and closing.close_code == 1001 and closing.messages
        assert flows[0].websocket is not None and flows[0].websocket.close_code == 1000
        assert flows[0].metadata[METADATA_KEY]["socket_open"]
        for flow, turn in zip(flows[:2], (first, second), strict=True):
            meta = flow.metadata[METADATA_KEY]
            assert meta["client_flow"] == turn.flow_id
            assert turn.report.attempts[0].upstream_flow == flow.id
            assert "tok-" not in str(flow.request.headers)
            assert flow.websocket is not None
            sent = [m for m in flow.websocket.messages if m.from_client]
            assert len(sent) == 1 and b"response.create" in sent[0].content
        assert flows[1].metadata[METADATA_KEY]["socket"] == flows[0].id

    run(main())


def test_a_served_turn_is_freed_by_reference_counting_alone() -> None:
    """Nothing keeps a turn (its body, engine, flows) once it is over, its socket idle and
    recorded: not even a reference cycle that only Python's full collection would free."""

    async def main() -> None:
        emitter = HookEmitter(Hooks())

        def tap_for(turn: Turn, attempt: Attempt) -> SessionTap | None:
            return SessionFlowTap(turn=turn, attempt=attempt, emit=emitter, redact=True, secrets=())

        async with rig(taps=tap_for) as r:
            await r.post(STREAM, SESSION)  # what is made once (imports, caches) is made here
            gc.collect()
            gc.disable()
            try:
                # A new socket's turn, then a turn on that socket again.
                for session in ([("session-id", "s-2")], [("session-id", "s-2")]):
                    turn, answer = await r.post(STREAM, session)
                    assert answer.status_code == 200
                    freed = weakref.ref(turn)
                    del turn
                    await asyncio.sleep(0)
                    assert freed() is None
            finally:
                gc.enable()
        await emitter.drain()

    run(main())


@pytest.mark.parametrize("idle_ttl", [0.0])
def test_no_reuse_when_the_idle_ttl_is_zero(idle_ttl: float) -> None:
    async def main() -> None:
        async with rig() as r:
            r.service.apply_settings(
                dataclasses.replace(r.service.settings, session_idle_ttl_s=idle_ttl)
            )
            await r.post(STREAM, SESSION)
            second, _ = await r.post(STREAM, SESSION)
            assert not second.report.attempts[0].reused
            assert len(r.upstream.records()) == 2

    run(main())


def test_a_new_session_sends_its_own_upgrade_on_a_connection_made_ahead() -> None:
    async def main() -> None:
        async with rig(preconnect=1) as r:
            first, _ = await r.post(STREAM, SESSION)
            await r.service.connector.wait_idle()
            second, response = await r.post(STREAM, [("session-id", "s-2")])
            assert response.status_code == 200
            assert not first.report.attempts[0].preconnected
            assert second.report.attempts[0].preconnected
            # Two handshakes, each the request's own: nothing was sent ahead of a request.
            sessions = [rec.header("session-id") for rec in r.upstream.records()]
            assert sessions == ["s-1", "s-2"]
            await r.service.connector.wait_idle()
            assert r.service.connector.ready_count == 1

    run(main())


def test_thirty_new_hard_sessions_spread_evenly_over_three_accounts() -> None:
    async def main() -> None:
        async with rig(accounts=("a", "b", "c")) as r:
            owners = {}
            for n in range(30):
                turn, response = await r.post(STREAM, [("session-id", f"new-{n}")])
                assert response.status_code == 200
                owners[n] = turn.report.account
            served = Counter(owners.values())
            assert sum(served.values()) == 30
            assert max(served.values()) - min(served.values()) <= 1, served
            assert r.state.bound_sessions() == served
            # Hard sessions stay where they are bound, however the counts stand.
            for n in (0, 1, 2):
                turn, _ = await r.post(STREAM, [("session-id", f"new-{n}")])
                assert turn.report.account == owners[n]

    run(main())


def test_soft_and_unbound_requests_spread_too() -> None:
    async def main() -> None:
        async with rig(accounts=("a", "b", "c")) as r:
            soft = [await r.post({**STREAM, "prompt_cache_key": f"p-{n}"}) for n in range(6)]
            assert Counter(t.report.account for t, _ in soft) == {"a": 2, "b": 2, "c": 2}
            unbound = [await r.post(STREAM) for _ in range(6)]
            assert Counter(t.report.account for t, _ in unbound) == {"a": 2, "b": 2, "c": 2}
            # A soft key stays with its account while that account serves.
            turn, _ = await r.post({**STREAM, "prompt_cache_key": "p-0"})
            assert turn.report.account == soft[0][0].report.account

    run(main())


def test_with_figures_the_account_with_the_most_headroom_wins() -> None:
    async def main() -> None:
        async with rig(accounts=("a", "b", "c")) as r:
            reset_at = int(time.time()) + 3600
            for account, used in (("a", 30), ("b", 10), ("c", 60)):
                r.upstream.script(Plan(rate_limits=rate_limits_event(used, reset_at=reset_at)))
                # One session per account, each pinned there, to learn its figures.
                r.state.bind(classify([("session-id", f"learn-{account}")], {}), account)
                await r.post(STREAM, [("session-id", f"learn-{account}")])
            for n in range(6):
                turn, _ = await r.post(STREAM, [("session-id", f"new-{n}")])
                assert turn.report.account == "b"  # the most headroom, though it holds the most

    run(main())


def test_a_client_that_hangs_up_mid_stream_ends_the_upstream_turn() -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script(Plan(turn=TurnSpec(deltas=50), pace_s=0.01))
            sink = RecordingSink(hang_up_after=3)
            turn, response = await post_turn(r.service, STREAM, SESSION, sink=sink)
            assert response.status_code == 200
            assert sink.calls == ["start", "write", "write", "write"] and not sink.finished
            ended = await r.upstream.wait_until(lambda rs: bool(rs and rs[0].closed_by), BOUND_S)
            (record,) = ended
            assert len(record.events) < 50
            # The socket is not kept for the next turn: its turn never ended.
            assert r.service.sessions.idle_count == 0
            assert [a.outcome for a in turn.report.attempts] == [CLIENT_GONE]

    run(main())


def _events(body: bytes) -> list[str]:
    return [
        line[len("event: ") :] for line in body.decode().splitlines() if line.startswith("event: ")
    ]


def test_events_reach_a_client_in_the_upstreams_data_callback_and_in_order() -> None:
    async def main() -> None:
        async with rig() as r:
            sink = RecordingSink()
            paced = {**STREAM, "metadata": {"local_deltas": "40", "local_pace_ms": "1"}}
            turn, response = await post_turn(r.service, paced, SESSION, sink=sink)
            assert response.status_code == 200
            events = _events(response.content)
            assert events[0] == "response.created" and events[-1] == "response.completed"
            assert events.count("response.output_text.delta") == 40
            # Paced events arrive one by one: each is its own write.
            assert sink.calls.count("write") >= 40
            assert turn.report.outcome == "response.completed"

    run(main())


def test_a_client_too_slow_for_writes_at_once_gets_every_event_by_waiting_writes() -> None:
    async def main() -> None:
        async with rig() as r:
            sink = RecordingSink()
            sink.stall = True
            paced = {**STREAM, "metadata": {"local_deltas": "20", "local_pace_ms": "1"}}
            _, response = await post_turn(r.service, paced, SESSION, sink=sink)
            assert response.status_code == 200
            assert _events(response.content).count("response.output_text.delta") == 20
            assert _events(response.content)[-1] == "response.completed"

    run(main())


def test_a_client_that_leaves_during_a_write_at_once_ends_the_upstream_turn() -> None:
    async def main() -> None:
        async with rig() as r:
            sink = RecordingSink(hang_up_after=3)
            paced = {**STREAM, "metadata": {"local_deltas": "50", "local_pace_ms": "2"}}
            turn, _ = await post_turn(r.service, paced, SESSION, sink=sink)
            assert turn.report.attempts[-1].outcome == "client_gone"
            # The socket closed (1001): nothing idles for the session.
            assert r.service.sessions.idle_count == 0

    run(main())


def test_a_turn_state_issued_after_the_head_reaches_the_sessions_next_answer() -> None:
    late = {"type": "response.metadata", "headers": {"x-codex-turn-state": "ts-late"}}

    async def main() -> None:
        async with rig() as r:
            # After created, in_progress, output_item.added, content_part.added, paced: the
            # head is out by then.
            r.upstream.default_plan = Plan(extra_events=((4, late),), pace_s=0.05)
            _, first = await r.post(STREAM, SESSION)
            assert "x-codex-turn-state" not in first.headers
            _, second = await r.post(STREAM, SESSION)
            assert second.headers["x-codex-turn-state"] == "ts-late"
            assert len(r.upstream.records()) == 1  # the same socket

    run(main())


def test_an_overload_after_created_is_retried_unseen_on_the_other_account() -> None:
    overloaded = {
        "type": "error",
        "error": {"type": "server_error", "code": "server_is_overloaded", "message": "busy"},
    }

    async def main() -> None:
        async with rig() as r:
            r.upstream.script(Plan(error=overloaded, error_after_events=2))
            turn, response = await r.post({**STREAM, "prompt_cache_key": "k"})
            assert response.status_code == 200
            assert sse_types(response.content).count("response.created") == 1
            first, second = (a.account for a in turn.report.attempts)
            assert first != second
            assert turn.report.attempts[0].outcome == "error_event:server_is_overloaded"

    run(main())
