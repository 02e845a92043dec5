"""End to end: WebSocket clients (Codex CLI's default transport) served by the pool.

A client's upgrade on `…/responses` through a pool with client keys is
answered by the bridge; its messages go upstream on the bridge's own socket,
with the chosen account's credential and the handshake the header policy
builds, and the frames come back as they were. Driven with the captured
Codex CLI WebSocket handshake and messages.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.proxy_process import ProxyProcess
from responses_ws_bridge.local.response_events import rate_limits_event
from responses_ws_bridge.local.upstream import ConnectionRecord, Plan, ThreadedUpstream
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.support.data import load_capture
from tests.support.http import client

UPSTREAM_TOKENS = {"tok-team-a": "team-a", "tok-team-b": "team-b"}
CLIENT_KEY = "client-key-ws-1"
TERMINAL = {"response.completed", "response.failed", "response.incomplete", "error"}
# What the WebSocket library writes itself: not the client's to choose.
LIBRARY = {"host", "connection", "upgrade", "sec-websocket-key", "sec-websocket-version"}
LIBRARY_OWN = LIBRARY | {"sec-websocket-extensions", "user-agent"}


@pytest.fixture(scope="module")
def accounts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("accounts") / "accounts.json"
    accounts = [{"id": i, "access_token": f"tok-{i}"} for i in ("team-a", "team-b")]
    path.write_text(json.dumps({"accounts": accounts, "client_keys": [CLIENT_KEY]}))
    return path


@pytest.fixture(scope="module")
def bridge(upstream: ThreadedUpstream, accounts_file: Path) -> Iterator[ProxyProcess]:
    with ProxyProcess(
        "--mode",
        f"reverse:http://127.0.0.1:{upstream.port}",
        "--set",
        f"bridge_accounts={accounts_file}",
    ) as proxy:
        yield proxy


def codex_handshake(session: str, key: str = CLIENT_KEY) -> tuple[dict[str, str], str]:
    """Codex CLI's captured upgrade (ChatGPT backend) as a session of its own: headers, UA."""
    capture = load_capture("backend-api-codex-websocket.json")
    headers = {k: v for k, v in capture["headers"] if k.lower() not in LIBRARY_OWN}
    headers["authorization"] = f"Bearer {key}"
    for name in ("session-id", "thread-id", "x-client-request-id"):
        headers[name] = session
    agent = next(v for k, v in capture["headers"] if k.lower() == "user-agent")
    return headers, agent


def codex_messages(session: str) -> list[dict[str, Any]]:
    """The capture's two `response.create` messages (a prewarm, then the turn, whose
    `previous_response_id` is the prewarm's in the capture)."""
    capture = load_capture("backend-api-codex-websocket.json")
    return [{**m, "prompt_cache_key": session} for m in capture["messages"]]


def codex_turn(session: str) -> dict[str, Any]:
    """The capture's turn as a session's first message (no prewarm before it)."""
    _, message = codex_messages(session)
    return {k: v for k, v in message.items() if k != "previous_response_id"}


def open_ws(
    proxy: ProxyProcess, headers: dict[str, str], agent: str | None = None
) -> ClientConnection:
    url = proxy.url.replace("http://", "ws://") + "/backend-api/codex/responses"
    return connect(
        url,
        additional_headers=headers,
        user_agent_header=agent,
        compression=None,
        open_timeout=10,
        close_timeout=5,
    )


def turn(ws: ClientConnection, message: dict[str, Any]) -> list[dict[str, Any]]:
    """Sends one message; the frames up to the terminal event."""
    ws.send(json.dumps(message))
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["type"] not in TERMINAL:
        frames.append(json.loads(ws.recv(timeout=10)))
    return frames


def sockets(upstream: ThreadedUpstream) -> list[ConnectionRecord]:
    return [r for r in upstream.records() if r.method == "GET" and r.status is not None]


def assert_no_client_key_left(upstream: ThreadedUpstream) -> None:
    for record in upstream.records():
        assert CLIENT_KEY not in json.dumps(record.headers)
        assert all(CLIENT_KEY not in m.raw for m in record.messages)
        assert record.header("authorization") in ("Bearer tok-team-a", "Bearer tok-team-b")


def test_a_codex_websocket_session_and_its_compaction_land_on_one_account(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    session = "codex-ws-1"
    headers, agent = codex_handshake(session)
    prewarm, first = codex_messages(session)
    with open_ws(bridge, headers, agent) as ws:
        warmed = turn(ws, prewarm)
        assert warmed[-1]["type"] == "response.completed"
        # As Codex CLI does: the turn continues from the prewarm's response.
        first = {**first, "previous_response_id": warmed[-1]["response"]["id"]}
        answered = turn(ws, first)
        assert answered[-1]["type"] == "response.completed"
        second = {**first, "previous_response_id": answered[-1]["response"]["id"], "input": []}
        assert turn(ws, second)[-1]["type"] == "response.completed"
    http_headers = {k: v for k, v in headers.items() if k.lower() != "openai-beta"}
    with client() as http:
        compacted = http.post(
            f"{bridge.url}/backend-api/codex/responses/compact",
            headers=http_headers,
            json={"model": first["model"], "input": first["input"]},
        )
    assert compacted.status_code == 200, compacted.text
    records = upstream.wait_for(lambda rs: all(r.ended for r in rs) and len(rs) == 2, 10)
    socket, compaction = records
    assert (socket.method, compaction.method) == ("GET", "POST")
    assert socket.account == compaction.account
    # Every message went upstream exactly as the client sent it, on one socket.
    assert [m.data for m in socket.messages] == [prewarm, first, second]
    # The handshake: the client's own headers by the header policy, the account's credential.
    upgrade = {k.lower(): v for k, v in socket.headers}
    assert upgrade["authorization"] == f"Bearer tok-{socket.account}"
    assert upgrade["openai-beta"] == "responses_websockets=2026-02-06"
    assert [k for k, _ in socket.headers if k.lower() == "openai-beta"] == ["OpenAI-Beta"]
    assert upgrade["session-id"] == session
    assert upgrade["user-agent"] == agent
    for name in (
        "x-codex-turn-metadata",
        "x-codex-beta-features",
        "originator",
        "x-codex-window-id",
    ):
        assert upgrade[name] == headers[name]
    assert socket.closed_by == "client" and socket.close_code == 1000
    assert_no_client_key_left(upstream)


def test_a_1011_before_response_created_is_retried_on_the_hard_owner(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    headers, agent = codex_handshake("codex-ws-1011")
    message = codex_turn("codex-ws-1011")
    upstream.script(Plan(close_code=1011, close_after_events=0))
    with open_ws(bridge, headers, agent) as ws:
        frames = turn(ws, message)
    assert frames[0]["type"] == "response.created"
    assert frames[-1]["type"] == "response.completed"
    first, second = upstream.wait_for(lambda rs: len(rs) == 2 and all(r.ended for r in rs), 10)
    assert first.close_code == 1011 and first.account == second.account
    assert second.messages[0].data == message


def test_a_1011_after_response_created_closes_the_clients_socket_with_1011(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    headers, agent = codex_handshake("codex-ws-1011-after")
    message = codex_turn("codex-ws-1011-after")
    upstream.script(Plan(close_code=1011, close_after_events=2))
    with open_ws(bridge, headers, agent) as ws:
        ws.send(json.dumps(message))
        got = [json.loads(ws.recv(timeout=10)) for _ in range(2)]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert [e["type"] for e in got] == ["response.created", "response.in_progress"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    # Nothing was replayed.
    assert len(sockets(upstream)) == 1


def test_without_session_headers_the_first_message_chooses_and_a_soft_1011_moves(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    upstream.script(Plan(close_code=1011, close_after_events=0), account="team-a")
    upstream.script(Plan(close_code=1011, close_after_events=0), account="team-b")
    upstream.script(Plan(rate_limits=rate_limits_event(12, reset_at=4102444800)))
    with open_ws(bridge, {"authorization": f"Bearer {CLIENT_KEY}"}) as ws:
        frames = turn(
            ws,
            {"type": "response.create", "model": "m", "input": "x", "prompt_cache_key": "ws-soft"},
        )
    # The rate-limit frame is the client's to read, as from the upstream itself.
    assert [f["type"] for f in frames][:2] == ["codex.rate_limits", "response.created"]
    assert frames[-1]["type"] == "response.completed"
    accounts = [r.account for r in sockets(upstream)]
    assert len(accounts) == 3 and accounts[0] != accounts[1] and accounts[2] == accounts[0]


def test_a_previous_response_of_another_account_goes_to_its_producer(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    upstream.script(Plan(close_code=1011, close_after_events=0), account="team-a")
    with client() as http:
        made = http.post(
            f"{bridge.url}/v1/responses",
            headers={"authorization": f"Bearer {CLIENT_KEY}"},
            json={"model": "m", "input": "x", "stream": False, "prompt_cache_key": "ws-prev"},
        )
    response_id = made.json()["id"]
    producer = upstream.owner_of(response_id)
    upstream.reset()
    with open_ws(bridge, {"authorization": f"Bearer {CLIENT_KEY}"}) as ws:
        frames = turn(
            ws,
            {
                "type": "response.create",
                "model": "m",
                "input": [],
                "previous_response_id": response_id,
            },
        )
    assert frames[-1]["type"] == "response.completed"
    assert [r.account for r in sockets(upstream)] == [producer]


def test_a_hard_owner_that_refuses_the_handshake_is_the_clients_http_answer(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    headers, agent = codex_handshake("codex-ws-429")
    upstream.script(Plan(reject_status=429, reject_headers={"retry-after": "9"}))
    with pytest.raises(InvalidStatus) as refused:
        open_ws(bridge, headers, agent)
    assert refused.value.response.status_code == 429
    assert refused.value.response.headers["retry-after"] == "9"
    (record,) = upstream.records()
    assert record.status == 429


@pytest.mark.parametrize("key", [None, "wrong-key", "tok-team-a"])
def test_a_websocket_with_a_wrong_key_reaches_nothing(
    bridge: ProxyProcess, upstream: ThreadedUpstream, key: str | None
) -> None:
    headers, agent = codex_handshake("codex-ws-wrong", key or "")
    if key is None:
        del headers["authorization"]
    with pytest.raises(InvalidStatus) as refused:
        open_ws(bridge, headers, agent)
    assert refused.value.response.status_code == 401
    assert upstream.records() == []


def test_in_pass_through_mode_websocket_clients_pass_untouched(upstream: ThreadedUpstream) -> None:
    with ProxyProcess("--mode", f"reverse:http://127.0.0.1:{upstream.port}") as proxy:
        headers = {"authorization": "Bearer tok-team-a", "session-id": "pass-1"}
        with open_ws(proxy, headers) as ws:
            assert (
                turn(ws, {"type": "response.create", "model": "m", "input": "x"})[-1]["type"]
                == "response.completed"
            )
    (record,) = upstream.records()
    # The client's own handshake, as it sent it: no beta token added, its own credential.
    assert record.header("authorization") == "Bearer tok-team-a"
    assert record.header("openai-beta") is None
    assert record.header("x-request-id") is None
