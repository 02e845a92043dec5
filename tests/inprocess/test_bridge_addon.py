"""The addons' hooks, options and commands, with mitmproxy's own test helpers."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow
from responses_ws_bridge.addons import bridge_addons, flow_streaming
from responses_ws_bridge.addons.accounts import Accounts
from responses_ws_bridge.addons.responses_bridge import METADATA_KEY, ResponsesBridge
from responses_ws_bridge.core.affinity import classify
from responses_ws_bridge.core.turns import Turn
from responses_ws_bridge.shell.request_body import BodyCollector
from responses_ws_bridge.shell.sink import ClientSink


def responses_flow(body: bytes = b'{"model":"m","input":"x","stream":true}') -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method = "POST"
    flow.request.scheme = "https"
    flow.request.host = "api.openai.com"
    flow.request.port = 443
    flow.request.path = "/v1/responses"
    flow.request.headers["host"] = "api.openai.com"
    flow.request.content = body
    return flow


def hook(coro: Coroutine[Any, Any, None]) -> None:
    """Runs an async hook that answers without waiting (what these tests check)."""
    with pytest.raises(StopIteration):
        coro.send(None)


class Addons:
    """The bridge's addons as `addon/bridge.py` wires them."""

    def __init__(self) -> None:
        self.all = bridge_addons()
        self.bridge = next(a for a in self.all if isinstance(a, ResponsesBridge))
        self.accounts = next(a for a in self.all if isinstance(a, Accounts))


def test_other_requests_are_untouched() -> None:
    bridge = Addons().bridge
    with taddons.context(bridge) as tctx:
        tctx.configure(bridge)
        for method, path in [
            ("GET", "/v1/models"),
            ("POST", "/v1/responses/compact"),
            ("GET", "/v1/responses"),
        ]:
            flow = responses_flow()
            flow.request.method, flow.request.path = method, path
            hook(bridge.request(flow))
            assert flow.response is None
            assert flow.request.host == "api.openai.com"
            assert METADATA_KEY not in flow.metadata


def test_a_streamed_answer_is_marked_streamed_and_carries_the_turns_report() -> None:
    async def serve(turn: Turn, sink: ClientSink) -> None:
        await sink.start(200, [("content-type", "text/event-stream")])

    async def main() -> None:
        bridge = Addons().bridge
        bridge.service.serve = serve  # type: ignore[method-assign]
        with taddons.context(bridge) as tctx:
            tctx.configure(bridge)
            flow = responses_flow()
            await bridge.request(flow)
            assert flow.response is not None and flow.response.status_code == 200
            assert flow.response.headers["transfer-encoding"] == "chunked"
            # The destination is the one the client chose: nothing was redirected.
            assert flow.request.url == "https://api.openai.com/v1/responses"
            bridge.responseheaders(flow)
            # mitmproxy's own streamed-response path: it keeps the body only with
            # `store_streamed_bodies` (tests/e2e/test_e2e_bridge.py checks both ways).
            assert flow.response.stream is True
            bridge.response(flow)
            assert flow.metadata[METADATA_KEY]["role"] == "client"
            assert flow.metadata[METADATA_KEY]["outcome"]

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_client_that_leaves_cancels_its_turn() -> None:
    async def serve(turn: Turn, sink: ClientSink) -> None:
        await sink.start(200, [("content-type", "text/event-stream")])
        await asyncio.Event().wait()

    async def main() -> None:
        bridge = Addons().bridge
        bridge.service.serve = serve  # type: ignore[method-assign]
        with taddons.context(bridge) as tctx:
            tctx.configure(bridge)
            flow = responses_flow()
            await bridge.request(flow)
            (task,) = [routed.task for routed in bridge._routed.values()]
            bridge.error(flow)
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not bridge._routed

    asyncio.run(asyncio.wait_for(main(), 10))


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"nope", 400), (b'"text"', 400), (b'{"background": true}', 400), (b"{}" + b" " * 100, 413)],
)
def test_bad_bodies_are_answered_in_the_request_hook(body: bytes, status: int) -> None:
    bridge = Addons().bridge
    with taddons.context(bridge) as tctx:
        tctx.configure(bridge, bridge_max_body=50)
        flow = responses_flow(body)
        hook(bridge.request(flow))
        assert flow.response is not None and flow.response.status_code == status
        assert flow.response.headers["content-type"] == "application/json"
        assert json.loads(flow.response.content or b"")["error"]["message"]
        assert not bridge._routed


def test_declared_oversized_body_is_refused_before_it_is_read() -> None:
    bridge = Addons().bridge
    with taddons.context(bridge) as tctx:
        tctx.configure(bridge, bridge_max_body=10)
        flow = responses_flow()
        flow.request.headers["content-length"] = "1000"
        bridge.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 413


def test_without_streaming_in_mitmproxy_the_answer_is_503(monkeypatch: pytest.MonkeyPatch) -> None:
    bridge = Addons().bridge
    with taddons.context(bridge):
        monkeypatch.setattr(flow_streaming, "_installed", False)
        flow = responses_flow()
        hook(bridge.request(flow))
        assert flow.response is not None and flow.response.status_code == 503


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("bridge_upstream", "ftp://x", "bridge_upstream"),
        ("bridge_connect_timeout", "soon", "not a number"),
        ("bridge_connect_timeout", "0", "positive"),
        ("bridge_ping_interval", "-1", ">= 0"),
        ("bridge_max_body", 0, "positive"),
        ("bridge_retry_budget", -1, "negative"),
        ("bridge_session_idle_ttl", "inf", "finite"),
        ("bridge_trusted_upstreams", "https://chatgpt.com", "bridge_trusted_upstreams"),
        ("bridge_trusted_upstreams", "chatgpt.com:443", "not a host name"),
        ("bridge_stream_idle_timeout", "soon", "bridge_stream_idle_timeout"),
    ],
)
def test_bad_options_are_clear_errors(option: str, value: object, message: str) -> None:
    addons = Addons()
    with (
        taddons.context(*addons.all) as tctx,
        pytest.raises(exceptions.OptionsError, match=message),
    ):
        tctx.options.update(**{option: value})


def test_accounts_option_loads_and_keeps_previous_pool_on_error(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"accounts": [{"id": "a", "api_key": "sk-aaaaaaaaaa"}]}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"accounts": [{"id": "a"}]}))
    addons = Addons()
    accounts, state = addons.accounts, addons.bridge.service.state
    with taddons.context(*addons.all) as tctx:
        tctx.configure(accounts, bridge_accounts=str(good))
        assert state.pool is not None and state.pool.ids == ["a"]
        with pytest.raises(exceptions.OptionsError) as raised:
            tctx.configure(accounts, bridge_accounts=str(bad))
        assert "accounts[0]" in str(raised.value)
        assert state.pool.ids == ["a"]
        assert "a" in accounts.accounts_command() and "healthy" in accounts.accounts_command()
        assert "sk-aaaaaaaaaa" not in accounts.accounts_command()
        state.bind(classify([("session-id", "s-1")], {}), "a")
        head, row = (re.split(r"\s{2,}", line) for line in accounts.accounts_command().splitlines())
        columns = dict(zip(head, row, strict=True))
        assert columns["sessions"] == "1" and columns["in flight"] == "0"
        tctx.configure(accounts, bridge_accounts="")
        assert state.pool is None
        assert "pass-through" in accounts.accounts_command()


def test_client_key_is_checked_before_anything_else(tmp_path: Path) -> None:
    path = tmp_path / "accounts.json"
    path.write_text(
        json.dumps({"accounts": [{"id": "a", "api_key": "sk-aaaaaaaaaa"}], "client_keys": ["ck"]})
    )
    addons = Addons()
    bridge = addons.bridge
    with taddons.context(*addons.all) as tctx:
        tctx.configure(addons.accounts, bridge_accounts=str(path))
        flow = responses_flow(b"not even json")
        flow.request.headers["authorization"] = "Bearer wrong"
        bridge.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 401
        flow = responses_flow(b"not even json")
        flow.request.headers["authorization"] = "Bearer wrong"
        hook(bridge.request(flow))
        assert flow.response is not None and flow.response.status_code == 401
        flow = responses_flow()
        flow.request.headers["authorization"] = "Bearer ck"

        async def take_the_body() -> None:
            bridge.requestheaders(flow)

        asyncio.run(take_the_body())
        assert flow.response is None
        assert isinstance(flow.request.stream, BodyCollector)
        flow_streaming.forget(flow)


def test_sessions_command_lists_bindings() -> None:
    bridge = Addons().bridge
    with taddons.context(bridge):
        assert bridge.sessions_command().splitlines()[0].split() == [
            "key",
            "kind",
            "account",
            "idle",
            "sockets",
            "idle",
            "for",
        ]
