"""The pooled usage answer, where Codex CLI reads it (`addons.usage`)."""

from __future__ import annotations

import json

from mitmproxy import http
from mitmproxy.test import tflow
from responses_ws_bridge.addons.usage import PooledUsage
from responses_ws_bridge.core.accounts import parse_accounts
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.rate_limits import RateLimits, Window

NOW = 1_800_000_000.0


def usage_flow(path: str = "/backend-api/wham/usage", key: str | None = "ck") -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method = "GET"
    flow.request.path = path
    if key is not None:
        flow.request.headers["authorization"] = f"Bearer {key}"
    return flow


def pool_state(client_keys: list[str] | None = None) -> PoolState:
    state = PoolState(clock=lambda: 100.0)
    config: dict[str, object] = {
        "accounts": [{"id": "a", "api_key": "sk-a"}, {"id": "b", "api_key": "sk-b"}]
    }
    if client_keys is not None:
        config["client_keys"] = client_keys
    state.set_accounts(parse_accounts(json.dumps(config)))
    return state


def test_the_pool_answers_where_codex_reads_its_usage() -> None:
    state = pool_state()
    assert state.pool is not None
    state.pool.record_rate_limits("a", RateLimits(Window(20, 300, NOW + 60)))
    state.pool.record_rate_limits("b", RateLimits(Window(60, 300, NOW + 120)))
    for path in ("/backend-api/wham/usage", "/api/codex/usage"):
        flow = usage_flow(path)
        PooledUsage(state, lambda: NOW).request(flow)
        assert flow.response is not None and flow.response.status_code == 200
        report = json.loads(flow.response.content or b"")
        assert report["rate_limit"]["primary_window"]["used_percent"] == 40
        assert report["rate_limit"]["allowed"] is True
        assert flow.metadata["responses_bridge"]["role"] == "client"


def test_the_client_keys_guard_it() -> None:
    state = pool_state(["ck"])
    flow = usage_flow(key="wrong")
    PooledUsage(state, lambda: NOW).request(flow)
    assert flow.response is not None and flow.response.status_code == 401
    flow = usage_flow(key="ck")
    PooledUsage(state, lambda: NOW).request(flow)
    assert flow.response is not None and flow.response.status_code == 200


def test_without_a_pool_or_on_other_paths_nothing_is_answered() -> None:
    flow = usage_flow()
    PooledUsage(PoolState(), lambda: NOW).request(flow)
    assert flow.response is None
    flow = usage_flow("/backend-api/wham/tasks/list")
    PooledUsage(pool_state(), lambda: NOW).request(flow)
    assert flow.response is None
