"""End to end: every upstream session becomes a flow, saved by -w, linked and redacted."""

from __future__ import annotations

import json
from pathlib import Path

from harness.proxy_process import ProxyProcess
from mitmproxy import http
from mitmproxy import io as mitm_io
from responses_ws_bridge.local.upstream import Plan, ThreadedUpstream

from tests.support.http import client

TOKENS = {"tok-team-a-0123456789": "team-a", "tok-team-b-0123456789": "team-b"}


def read_flows(path: Path) -> list[http.HTTPFlow]:
    with path.open("rb") as f:
        return [fl for fl in mitm_io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]


def role(flow: http.HTTPFlow) -> str:
    return str(flow.metadata.get("responses_bridge", {}).get("role"))


def test_upstream_sessions_are_saved_linked_and_redacted(tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.json"
    accounts.write_text(
        json.dumps(
            {
                "accounts": [
                    {"id": "team-a", "access_token": "tok-team-a-0123456789"},
                    {"id": "team-b", "access_token": "tok-team-b-0123456789"},
                ]
            }
        )
    )
    out = tmp_path / "out.mitm"
    with ThreadedUpstream(tokens=TOKENS) as upstream:
        upstream.script(Plan(close_code=1011, close_after_events=0), account="team-a")
        with ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{upstream.port}",
            "--set",
            "connection_strategy=lazy",
            "--set",
            f"bridge_accounts={accounts}",
            "-w",
            str(out),
        ) as proxy:
            with client() as http_client:
                response = http_client.post(
                    f"{proxy.url}/v1/responses",
                    json={"model": "m", "input": "x", "stream": True},
                    headers={"session-id": "rec-1", "authorization": "Bearer sk-client-999999999"},
                )
            assert response.status_code == 200
            proxy.stop()
        records = upstream.records()

    flows = read_flows(out)
    (client_flow,) = [f for f in flows if role(f) == "client"]
    # One flow per socket that carried the request; the close at shutdown is the last turn's.
    upstream_flows = [f for f in flows if role(f) == "upstream"]
    assert len(upstream_flows) == 2 == len(records)
    closing = upstream_flows[1]
    assert closing.websocket is not None and closing.websocket.close_code == 1001
    assert closing.websocket.closed_by_client is True
    assert closing.websocket.close_reason == "proxy shutting down"
    meta = client_flow.metadata["responses_bridge"]
    assert meta["upstream_flows"] == [f.id for f in upstream_flows]
    assert [a["close_code"] for a in meta["attempts"] if "close_code" in a] == [1011]

    first, second = upstream_flows
    for number, (flow, record) in enumerate(zip(upstream_flows, records, strict=True), 1):
        up_meta = flow.metadata["responses_bridge"]
        assert up_meta["account"] == "team-a" and up_meta["attempt"] == number
        assert up_meta["client_flow"] == client_flow.id
        assert up_meta["affinity"] == "hard" and up_meta["key"] == "session:rec-1"
        # The handshake as sent, with the credential redacted.
        sent = [(k, v) for k, v in flow.request.headers.items(multi=True)]
        received = [
            (k, "Bearer <redacted:team-a>" if k.lower() == "authorization" else v)
            for k, v in record.headers
        ]
        assert sent == received
        assert flow.response is not None and flow.response.status_code == 101
        assert flow.websocket is not None

    assert first.websocket is not None and second.websocket is not None
    assert first.websocket.close_code == 1011 and first.websocket.closed_by_client is False
    assert [m.from_client for m in first.websocket.messages] == [True]
    to_client = [m for m in second.websocket.messages if not m.from_client]
    assert [json.loads(m.content)["type"] for m in to_client] == records[1].event_types
    assert json.loads(second.websocket.messages[0].content)["type"] == "response.create"
    # A recorded file is safe to commit: no credential anywhere in it.
    raw = out.read_bytes()
    for secret in ["tok-team-a-0123456789", "tok-team-b-0123456789", "sk-client-999999999"]:
        assert secret.encode() not in raw


def test_rejected_and_unreachable_upstreams_are_recorded(tmp_path: Path) -> None:
    out = tmp_path / "out.mitm"
    with ThreadedUpstream() as upstream:
        upstream.script(
            Plan(reject_status=429, reject_headers={"Retry-After": "9"}),
        )
        with ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{upstream.port}",
            "--set",
            "connection_strategy=lazy",
            "-w",
            str(out),
        ) as proxy:
            with client() as http_client:
                response = http_client.post(
                    f"{proxy.url}/v1/responses", json={"model": "m", "input": "x"}
                )
            assert response.status_code == 429
            proxy.stop()
    (rejected,) = [f for f in read_flows(out) if role(f) == "upstream"]
    assert rejected.response is not None and rejected.response.status_code == 429
    assert rejected.response.headers["retry-after"] == "9"
    assert rejected.websocket is None


def test_recording_can_be_switched_off(tmp_path: Path) -> None:
    out = tmp_path / "out.mitm"
    with (
        ThreadedUpstream() as upstream,
        ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{upstream.port}",
            "--set",
            "connection_strategy=lazy",
            "--set",
            "bridge_record=false",
            "-w",
            str(out),
        ) as proxy,
    ):
        with client() as http_client:
            assert (
                http_client.post(
                    f"{proxy.url}/v1/responses", json={"model": "m", "input": "x"}
                ).status_code
                == 200
            )
        proxy.stop()
    assert [role(f) for f in read_flows(out)] == ["client"]
