"""A real mitmdump against a hostile upstream: credentials, secrets, accounts reload mid-turn.

One mitmdump for the module, with an account pool whose accounts name no
upstream, listening in regular mode (where the client picks the destination)
and in reverse mode to the hostile upstream (where the operator did). The
last test stops it to read the `-w` flow file.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness.proxy_process import ProxyProcess
from mitmproxy import http, io
from responses_ws_bridge.core.sse import parse_sse
from responses_ws_bridge.local.loop_thread import LoopThread
from responses_ws_bridge.local.ports import free_port

from tests.support.hostile_upstream import (
    Behaviour,
    HostileUpstream,
    Hostility,
    bearer_of,
)
from tests.support.http import client

TOKENS = {"team-a": "plainwordtokenalpha", "team-b": "plainwordtokenbravo"}
CLIENT_KEY = "plainwordclientkey"
STREAM = {"model": "m", "input": "hi", "stream": True}
BOUND_S = 10.0


def accounts_json(*ids: str) -> str:
    accounts = [{"id": i, "access_token": TOKENS[i]} for i in ids]
    return json.dumps({"accounts": accounts, "client_keys": [CLIENT_KEY]})


@pytest.fixture(scope="module")
def hostile() -> Iterator[LoopThread[HostileUpstream]]:
    with LoopThread(HostileUpstream(), name="hostile") as thread:
        yield thread


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    accounts = folder / "accounts.json"
    accounts.write_text(accounts_json("team-a", "team-b"))
    return accounts, folder / "flows.mitm"


@pytest.fixture(scope="module")
def reverse_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def bridge(
    hostile: LoopThread[HostileUpstream], files: tuple[Path, Path], reverse_port: int
) -> Iterator[ProxyProcess]:
    accounts, flows = files
    with ProxyProcess(
        "--mode",
        "regular",
        "--mode",
        f"reverse:http://127.0.0.1:{hostile.port}@127.0.0.1:{reverse_port}",
        "--set",
        "connection_strategy=lazy",
        "--set",
        f"bridge_accounts={accounts}",
        "-w",
        str(flows),
    ) as proxy:
        yield proxy


def post(
    url: str, headers: dict[str, str] | None = None, *, proxy: str | None = None
) -> httpx.Response:
    with client(proxy=proxy, timeout=BOUND_S) as http_client:
        return http_client.post(
            url,
            json=STREAM,
            headers={"authorization": f"Bearer {CLIENT_KEY}", **(headers or {})},
        )


def wait_for(check: Any, timeout: float = BOUND_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def test_a_client_chosen_destination_gets_no_credential(
    bridge: ProxyProcess, hostile: LoopThread[HostileUpstream]
) -> None:
    before = len(hostile.server.records)
    response = post(f"http://127.0.0.1:{hostile.port}/v1/responses", proxy=bridge.url)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "untrusted_upstream"
    assert "bridge_trusted_upstreams" in response.json()["error"]["message"]
    assert len(hostile.server.records) == before
    assert " attempt 1 on " not in bridge.log()  # no account was tried, none judged


def test_the_proxy_is_never_its_own_upstream(bridge: ProxyProcess) -> None:
    response = post(f"http://127.0.0.1:{bridge.port}/v1/responses", proxy=bridge.url)
    assert response.status_code == 403
    assert "this proxy itself" in response.json()["error"]["message"]


def test_a_removed_account_mid_turn_is_not_bound_again_and_its_socket_closes(
    bridge: ProxyProcess,
    hostile: LoopThread[HostileUpstream],
    files: tuple[Path, Path],
    reverse_port: int,
) -> None:
    accounts, _ = files
    upstream = hostile.server
    before = len(upstream.records)
    upstream.script(Hostility(Behaviour.HOLD))
    url = f"http://127.0.0.1:{reverse_port}/v1/responses"
    session = {"session-id": "reload-1"}
    result: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: result.append(post(url, session)))
    worker.start()
    try:
        assert wait_for(lambda: len(upstream.records) > before and upstream.records[-1].messages)
        held = upstream.records[-1]
        owner = next(a for a, t in TOKENS.items() if bearer_of(held.headers) == t)
        keep = next(a for a in TOKENS if a != owner)
        accounts.write_text(accounts_json(keep))
        assert wait_for(lambda: f"bridge accounts reloaded: {keep}" in bridge.log())
    finally:
        hostile.call(upstream.release)
        worker.join(BOUND_S)
    assert result and result[0].status_code == 200
    assert parse_sse(result[0].content)[-1][0] == "response.completed"
    assert wait_for(lambda: held.closed)  # the removed account's socket is not kept
    again = post(url, session)
    assert again.status_code == 200
    assert bearer_of(upstream.records[-1].headers) == TOKENS[keep]
    accounts.write_text(accounts_json("team-a", "team-b"))
    assert wait_for(lambda: "bridge accounts reloaded: team-a, team-b" in bridge.log())


def _texts(flow: http.HTTPFlow) -> list[str]:
    out = [flow.comment, json.dumps(flow.metadata, default=str)]
    for message in (flow.request, flow.response):
        if message is not None:
            out += [f"{k}: {v}" for k, v in message.headers.items(multi=True)]
            out.append((message.raw_content or b"").decode("utf-8", "replace"))
    if flow.websocket is not None:
        out += [m.content.decode("utf-8", "replace") for m in flow.websocket.messages]
        out.append(flow.websocket.close_reason or "")
    if flow.error is not None:
        out.append(flow.error.msg)
    return out


def test_echoed_tokens_reach_no_client_log_or_flow_file(
    bridge: ProxyProcess,
    hostile: LoopThread[HostileUpstream],
    files: tuple[Path, Path],
    reverse_port: int,
) -> None:
    url = f"http://127.0.0.1:{reverse_port}/v1/responses"
    plans = [
        (Hostility(Behaviour.ECHO_TOKEN_IN_CLOSE, after_events=2), 200),
        (Hostility(Behaviour.ECHO_TOKEN_IN_ERROR), 400),
        (Hostility(Behaviour.ECHO_TOKEN_IN_429), 429),
    ]
    bodies = []
    for n, (plan, status) in enumerate(plans):
        hostile.server.script(plan)
        response = post(url, {"session-id": f"echo-{n}"})
        assert response.status_code == status
        bodies.append(response.content.decode())
    assert "<redacted>" in "".join(bodies)
    echoed = [r for r in hostile.server.records[-3:] if r.headers]
    assert len(echoed) == 3
    bridge.stop()  # the flow file is complete once mitmdump has exited
    _, flows = files
    with flows.open("rb") as f:
        saved = [flow for flow in io.FlowReader(f).stream() if isinstance(flow, http.HTTPFlow)]
    assert any(f.websocket is not None for f in saved)  # upstream sessions were recorded
    texts = [*bodies, bridge.log(), *(t for flow in saved for t in _texts(flow))]
    for secret in (*TOKENS.values(), CLIENT_KEY):
        assert not [t for t in texts if secret in t], secret
