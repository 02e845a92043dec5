"""Forwarded HTTP exchanges are recorded as flows and replayed on the replay server's port."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from mitmproxy import io as mitmio
from responses_ws_bridge.recording.replay import (
    ThreadedReplayServer,
    load_exchanges,
    load_sessions,
)
from responses_ws_bridge.recording.session_flows import (
    UpstreamMeta,
    new_exchange_flow,
    record_exchange_answer,
)

BODY = {"model": "m", "input": "context"}
ANSWER = {"object": "response.compaction", "output": []}


def recorded(path: Path) -> Path:
    flow = new_exchange_flow(
        url="http://127.0.0.1:1/v1/responses/compact",
        method="POST",
        headers=[
            ("session-id", "s-1"),
            ("Authorization", "Bearer tok-a"),
            ("Content-Type", "application/json"),
        ],
        body=json.dumps(BODY).encode(),
        timestamp=1.0,
        meta=UpstreamMeta("team-a", "hard", "session:s-1", 1),
        client_flow_id="client-1",
        route="compact",
        secrets=["tok-a"],
    )
    record_exchange_answer(
        flow,
        status=200,
        reason="OK",
        headers=[("Content-Type", "application/json"), ("Content-Length", "2")],
        body=json.dumps(ANSWER).encode(),
        timestamp=2.0,
    )
    assert flow.request.headers["authorization"] == "Bearer <redacted:team-a>"
    with path.open("wb") as fp:
        mitmio.FlowWriter(fp).add(flow)
    return path


def test_a_recorded_exchange_is_no_websocket_session_and_replays_as_it_was(
    tmp_path: Path,
) -> None:
    path = recorded(tmp_path / "x.mitm")
    assert load_sessions([path]) == []
    (exchange,) = load_exchanges([path])
    with ThreadedReplayServer(
        [], exchanges=[exchange, exchange], tokens={"tok-a": "team-a"}
    ) as srv:
        url = f"http://127.0.0.1:{srv.port}/v1/responses/compact"
        headers = {"session-id": "s-1", "authorization": "Bearer tok-a"}
        with httpx.Client(trust_env=False, timeout=10) as client:
            same = client.post(url, headers=headers, json=BODY)
            other = client.post(
                url,
                headers={"session-id": "s-2", "authorization": "Bearer tok-b"},
                json={**BODY, "input": "else"},
            )
            beyond = client.post(url, headers=headers, json=BODY)
        assert same.status_code == 200 and same.json() == ANSWER
        assert other.status_code == 200
        assert beyond.status_code == 503
        assert srv.exchanges_served == 3
        # httpx's own fields (accept, user-agent, …) are not the recording's: left aside.
        ours = [d for d in srv.deviations if d.field in ("account", "request", "body.input")]
        ours += [d for d in srv.deviations if d.field == "header session-id"]
        assert sorted(str(d) for d in ours) == sorted(
            [
                "exchange 1: account changed: expected 'team-a', got 'client'",
                "exchange 1: header session-id changed: expected 's-1', got 's-2'",
                "exchange 1: body.input changed: expected 'context', got 'else'",
                "exchange 2: request unexpected: "
                "'POST /v1/responses/compact beyond the 2 recorded'",
            ]
        )
