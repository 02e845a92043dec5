"""Forwarded requests in one event loop: the service, the h11 client and the answer cache
against the real local upstream's HTTP side."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from responses_ws_bridge.core.accounts import parse_accounts
from responses_ws_bridge.core.affinity import NO_AFFINITY, Affinity, AffinityKind, classify
from responses_ws_bridge.core.answer_cache import AnswerCache
from responses_ws_bridge.core.create_request import CreateRequest
from responses_ws_bridge.core.forward_policy import CachedAnswer
from responses_ws_bridge.core.pool_routes import Route, RouteKind, route
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.turns import Destination, ForwardedHttp, Turn
from responses_ws_bridge.local.ports import free_port
from responses_ws_bridge.local.upstream import HttpPlan, LocalUpstream
from responses_ws_bridge.shell.answer_flights import AnswerFlights
from responses_ws_bridge.shell.bridge_service import BridgeService, BridgeSettings
from responses_ws_bridge.shell.session_pool import SessionPool
from responses_ws_bridge.shell.upstream_client import UpstreamSettings

from tests.support.service import no_sleep
from tests.support.sink import RecordingSink

TOKENS = {"tok-a": "a", "tok-b": "b"}
SESSION = [("session-id", "s-fwd"), ("authorization", "Bearer client-key")]


@dataclass
class Rig:
    upstream: LocalUpstream
    service: BridgeService
    state: PoolState

    async def send(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        headers: list[tuple[str, str]] | None = None,
        affinity: Affinity | None = None,
    ) -> RecordingSink:
        raw = json.dumps(body).encode() if body is not None else b""
        served = route(method, path)
        client_headers = tuple(headers or [])
        turn = Turn(
            flow_id="f",
            create=CreateRequest(stream=False, message=b"", body=body or {}),
            client_headers=client_headers,
            request_id="req-f",
            destination=Destination("http", "127.0.0.1", self.upstream.port, path),
            affinity=affinity or classify(client_headers, body or {}),
            client_credential=None,
            http=ForwardedHttp(served, method, raw),
        )
        sink = RecordingSink()
        await self.service.forward(turn, sink)
        return sink


@asynccontextmanager
async def rig(*, upstream_option: str = "") -> AsyncIterator[Rig]:
    async with LocalUpstream(tokens=TOKENS) as upstream:
        state = PoolState()
        listed = [{"id": i, "api_key": f"tok-{i}"} for i in ("a", "b")]
        state.set_accounts(parse_accounts(json.dumps({"accounts": listed})))
        settings = BridgeSettings(
            upstream_option=upstream_option or f"ws://127.0.0.1:{upstream.port}",
            upstream=UpstreamSettings(connect_timeout=5, ping_interval=None),
            preconnect=0,
            stream_idle_timeout_s=5,
        )
        service = BridgeService(settings, state=state, sessions=SessionPool(), sleep=no_sleep)
        try:
            yield Rig(upstream, service, state)
        finally:
            await service.shutdown()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_compaction_streams_back_as_the_upstream_answered() -> None:
    async def main() -> None:
        async with rig() as r:
            body = {"model": "m", "input": "context"}
            sink = await r.send("POST", "/v1/responses/compact", body=body, headers=SESSION)
            assert (sink.status, sink.calls[0], sink.calls[-1]) == (200, "start", "finish")
            answer = json.loads(sink.body)
            assert answer["object"] == "response.compaction"
            (record,) = r.upstream.records()
            assert record.method == "POST" and json.loads(record.body) == body
            assert record.header("authorization") == f"Bearer tok-{record.account}"
            assert record.header("session-id") == "s-fwd"
            # The session is bound: its next request goes to the same account.
            assert r.state.bindings.get("session:s-fwd") is not None

    run(main())


def test_rate_limit_headers_of_an_http_answer_become_the_accounts_figures() -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script_http(HttpPlan(headers={"x-codex-primary-used-percent": "37"}))
            sink = await r.send("GET", "/v1/models", affinity=NO_AFFINITY)
            assert sink.status == 200
            account = r.upstream.records()[0].account
            assert account is not None and r.state.pool is not None
            limits = r.state.pool.rate_limits(account)
            assert limits is not None and limits.primary is not None
            assert limits.primary.used_percent == 37

    run(main())


def test_a_5xx_answer_moves_a_request_without_affinity_to_the_other_account() -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script_http(HttpPlan(503))
            sink = await r.send("POST", "/v1/files", body={"x": 1}, affinity=NO_AFFINITY)
            assert sink.status == 200
            records = r.upstream.records()
            assert [x.status for x in records] == [503, 200]
            assert records[0].account != records[1].account

    run(main())


def test_an_unreachable_upstream_is_a_502_after_the_retries() -> None:
    async def main() -> None:
        async with rig(upstream_option=f"ws://127.0.0.1:{free_port()}") as r:
            sink = await r.send("GET", "/v1/models", affinity=NO_AFFINITY)
            assert sink.status == 502
            # The cause's own code, as for a bridged request, with a pool or without.
            assert json.loads(sink.body)["error"]["code"] == "upstream_unreachable"

    run(main())


def test_concurrent_model_reads_make_one_upstream_call() -> None:
    async def main() -> None:
        async with rig() as r:
            sinks = await asyncio.gather(
                *(r.send("GET", "/v1/models", affinity=NO_AFFINITY) for _ in range(6))
            )
            assert [s.status for s in sinks] == [200] * 6
            assert len({s.body for s in sinks}) == 1
            assert len(r.upstream.records()) == 1
            assert r.service.answers.fetches == 1

    run(main())


def test_a_failed_leader_lets_the_next_caller_fetch() -> None:
    async def main() -> None:
        flights = AnswerFlights(AnswerCache(lambda: 0.0))
        assert await flights.lookup("k") is None  # the leader
        waiting = asyncio.ensure_future(flights.lookup("k"))
        await asyncio.sleep(0)
        flights.store("k", None)
        assert await waiting is None  # it leads now
        third = asyncio.ensure_future(flights.lookup("k"))
        await asyncio.sleep(0)
        answer = CachedAnswer(200, (), b"{}")
        flights.store("k", answer)
        assert await third == answer
        assert await flights.lookup("k") == answer
        assert flights.fetches == 2

    run(main())


@pytest.mark.parametrize("path", ["/v1/responses/resp_1", "/v1/responses/resp_1/input_items"])
def test_reads_of_an_unknown_response_are_the_upstreams_404(path: str) -> None:
    async def main() -> None:
        async with rig() as r:
            affinity = Affinity(AffinityKind.SOFT, owner_hint="resp_1")
            sink = await r.send("GET", path, affinity=affinity)
            assert sink.status == 404
            assert [x.status for x in r.upstream.records()] == [404, 404]
            assert Route(RouteKind.ONE_RESPONSE, "resp_1") == route("GET", path)

    run(main())
