"""The recorded fixtures in flows/, replayed through the bridge as regression tests.

Each fixture's upstream sessions are served by the replay server; the bridge
runs in front of it with the fixture accounts; the recorded client request is
sent again. The client must see what it saw when the fixture was recorded, and
the replay server must see exactly the recorded handshakes and messages.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness.oauth_server import FakeTokenEndpoint
from harness.proxy_process import ProxyProcess
from mitmproxy import http
from mitmproxy import io as mitm_io
from responses_ws_bridge.core.sse import parse_sse
from responses_ws_bridge.recording.replay import (
    ThreadedReplayServer,
    load_exchanges,
    load_sessions,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.support.data import ROOT

FLOWS = ROOT / "flows"
ACCOUNTS = FLOWS / "accounts.json"
FIXTURES = sorted(p.name for p in FLOWS.glob("*.mitm"))
SEED_BUG = ROOT / "tests" / "support" / "seed_bug.py"
# What each fixture needs to replay, written by scripts/make_fixtures.py.
SPECS: dict[str, dict[str, Any]] = json.loads((FLOWS / "fixtures.json").read_text())


def tokens(spec: dict[str, Any]) -> dict[str, str]:
    config = json.loads((FLOWS / spec["accounts"]).read_text())
    found = {a["access_token"]: a["id"] for a in config["accounts"] if "access_token" in a}
    return {**found, **spec["tokens"]}


def client_flows(path: Path) -> list[http.HTTPFlow]:
    """The fixture's client requests, in the order they were sent."""
    with path.open("rb") as f:
        flows = [fl for fl in mitm_io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
    found = [f for f in flows if f.metadata.get("responses_bridge", {}).get("role") == "client"]
    return sorted(found, key=lambda f: f.request.timestamp_start)


def client_flow(path: Path) -> http.HTTPFlow:
    (flow,) = client_flows(path)
    return flow


# What the WebSocket library writes itself on a client's upgrade.
WS_OWN = {"host", "connection", "upgrade", "sec-websocket-key", "sec-websocket-version"}
TERMINAL = {"response.completed", "response.failed", "response.incomplete", "error"}


def replay_websocket(proxy: ProxyProcess, recorded: http.HTTPFlow) -> httpx.Response:
    """A recorded WebSocket client again: its upgrade, its messages; what came back, as one
    answer whose body is the server's messages, one JSON per line."""
    headers = [
        (k, v)
        for k, v in recorded.request.headers.items(multi=True)
        if k.lower() not in WS_OWN and not k.lower().startswith("sec-websocket-")
    ]
    assert recorded.websocket is not None
    sent = [m for m in recorded.websocket.messages if m.from_client]
    got: list[bytes] = []
    url = f"{proxy.url.replace('http://', 'ws://')}{recorded.request.path}"
    with ws_connect(
        url, additional_headers=headers, user_agent_header=None, compression=None
    ) as ws:
        for message in sent:
            ws.send(message.text)
            try:
                while True:
                    frame = ws.recv(timeout=10)
                    got.append(frame.encode() if isinstance(frame, str) else frame)
                    if json.loads(frame)["type"] in TERMINAL:
                        break
            except ConnectionClosed:
                break
    return httpx.Response(101, content=b"\n".join(got))


def server_messages(recorded: http.HTTPFlow) -> list[str]:
    assert recorded.websocket is not None
    return [json.loads(m.content)["type"] for m in recorded.websocket.messages if not m.from_client]


def replay(
    fixture: Path, *extra: str, speed: float | None = None
) -> tuple[list[httpx.Response], ThreadedReplayServer]:
    spec = SPECS[fixture.name]
    sessions = load_sessions([fixture])
    exchanges = load_exchanges([fixture])
    with (
        ThreadedReplayServer(
            sessions,
            tokens=tokens(spec),
            message_timeout=5,
            speed=speed,
            exchanges=exchanges,
        ) as server,
        FakeTokenEndpoint(spec["oauth"] or {}) as oauth,
        tempfile.TemporaryDirectory() as scratch,
    ):
        # A copy: a refreshing bridge writes its token state file beside it.
        accounts = Path(scratch) / spec["accounts"]
        shutil.copy(FLOWS / spec["accounts"], accounts)
        with ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{server.port}",
            *spec["args"],
            "--set",
            f"bridge_accounts={accounts}",
            "--set",
            f"bridge_oauth_token_url={oauth.url}",
            *extra,
        ) as proxy:
            responses = []
            with httpx.Client(trust_env=False, timeout=30) as client:
                for recorded in client_flows(fixture):
                    if recorded.websocket is not None:
                        responses.append(replay_websocket(proxy, recorded))
                        continue
                    headers = [
                        (k, v)
                        for k, v in recorded.request.headers.items(multi=True)
                        if k.lower() not in {"host", "content-length"}
                    ]
                    responses.append(
                        client.request(
                            recorded.request.method,
                            f"{proxy.url}{recorded.request.path}",
                            headers=headers,
                            content=recorded.request.raw_content or None,
                        )
                    )
            proxy.stop()  # idle sessions close, as they did when recorded
        server.wait_served(len(sessions), 10)
        assert oauth.reuses == 0
    return responses, server


def test_fixtures_exist() -> None:
    assert (
        set(FIXTURES)
        == set(SPECS)
        == {
            "hard-1011-retry-on-owner.mitm",
            "soft-1011-other-account.mitm",
            "1011-after-created.mitm",
            "hard-owner-keeps-failing.mitm",
            "codex-cli-http.mitm",
            "rate-limits-headers.mitm",
            "connection-limit-new-socket.mitm",
            "handoff-1000-same-account.mitm",
            "keepalive-1011-lost-connection.mitm",
            "drop-1006-same-account.mitm",
            "every-account-once.mitm",
            "output-items-json.mitm",
            "previous-response-invalid.mitm",
            "token-refresh.mitm",
            "reverse-default-strategy.mitm",
            "codex-session-one-socket.mitm",
            # Round two (issue #19): what the Codex backend and client do.
            "prewarm-resend-same-account.mitm",
            "vendor-events-by-path.mitm",
            "handshake-answer-headers.mitm",
            "error-frame-shapes.mitm",
            "overload-after-created.mitm",
            "codex-keepalive-before-created.mitm",
            "pool-exhausted-usage-limit.mitm",
            "auth-error-refresh.mitm",
            "auth-error-fail-over.mitm",
            "encrypted-content-not-moved.mitm",
            "first-event-deadline.mitm",
            "upstream-431-answered-once.mitm",
            "oversized-request-400.mitm",
            "compact-owner-after-1011.mitm",
            "websocket-client-1011-before-created.mitm",
        }
    )


# Upstream answer headers the client gets (`core.answer_headers`, `core.rate_limits`).
_ANSWER_HEADERS = {"x-reasoning-included", "x-models-etag", "openai-model"}


def answer_headers(headers: Any) -> list[tuple[str, str]]:
    """Rate-limit families (any `x-…` but the request id) and the 101's passed headers."""
    return sorted(
        (k.lower(), v)
        for k, v in headers.items()
        if (k.lower().startswith("x-") and k.lower() != "x-request-id")
        or k.lower() in _ANSWER_HEADERS
    )


def event_types(body: bytes) -> list[tuple[str | None, str]]:
    """The stream's events; `codex.keepalive` depends on timing and is left out."""
    found = [(t, json.loads(d)["type"]) for t, d in parse_sse(body)]
    return [e for e in found if e[0] != "codex.keepalive"]


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_replays_with_no_deviation(name: str) -> None:
    fixture = FLOWS / name
    responses, server = replay(fixture)
    assert [str(d) for d in server.deviations] == []
    assert len(server.served) == len(server.server.sessions) > 0
    assert server.exchanges_served == len(server.server.exchanges)
    recorded_flows = client_flows(fixture)
    assert len(responses) == len(recorded_flows)
    for response, recorded_flow in zip(responses, recorded_flows, strict=True):
        recorded = recorded_flow.response
        assert recorded is not None
        assert response.status_code == recorded.status_code
        if recorded_flow.websocket is not None:
            # A WebSocket client: the messages it got, as the recorded client got them.
            got_types = [json.loads(line)["type"] for line in response.content.splitlines()]
            assert got_types == server_messages(recorded_flow)
            continue
        assert answer_headers(response.headers) == answer_headers(recorded.headers)
        if recorded_flow.request.path.endswith("/compact"):
            # A forwarded answer is the upstream's, as it was.
            assert response.json() == json.loads(recorded.content or b"")
            continue
        same_answer(response, recorded.content or b"")


def same_answer(response: httpx.Response, want_body: bytes) -> None:
    """The replayed answer says what the recorded one said."""
    if response.headers.get("content-type") == "text/event-stream":
        assert event_types(response.content) == event_types(want_body)
        return
    want = json.loads(want_body)
    if response.status_code != 200:
        assert response.json()["error"]["code"] == want["error"]["code"]
        assert response.json()["error"]["type"] == want["error"]["type"]
        return
    if "rate_limit" in want:  # the pooled usage answer (its reset times follow the clock)
        got = response.json()
        assert got["rate_limit"]["limit_reached"] == want["rate_limit"]["limit_reached"]
        for window in ("primary_window", "secondary_window"):
            assert (got["rate_limit"][window] or {}).get("used_percent") == (
                want["rate_limit"][window] or {}
            ).get("used_percent")
        return
    got_output = [item["content"] for item in response.json()["output"]]
    assert got_output == [item["content"] for item in want["output"]]
    assert got_output


def test_fixture_catches_the_seed_bug() -> None:
    """With the owner wrongly excluded after 1011, the retry goes to team-b: a deviation."""
    _, server = replay(FLOWS / "hard-1011-retry-on-owner.mitm", "-s", str(SEED_BUG))
    deviations = [str(d) for d in server.deviations]
    # Sessions count from 0: the retry (the second session) went to the wrong account.
    assert "session 1: account changed: expected 'team-a', got 'team-b'" in deviations


def test_codex_clients_get_keepalive_events_before_created_and_v1_clients_none() -> None:
    """Replayed with the recorded timing: the queue before response.created is there again."""
    responses, server = replay(FLOWS / "codex-keepalive-before-created.mitm", speed=1.0)
    assert [str(d) for d in server.deviations] == []
    codex, public = ([t for t, _ in parse_sse(r.content)] for r in responses)
    assert codex[0] == "codex.keepalive"
    assert codex.index("response.created") > 0
    assert public[0] == "response.created" and "codex.keepalive" not in public
    assert b": keepalive" not in responses[1].content.split(b"event: response.created")[0]


def test_a_pool_out_on_usage_limits_answers_as_codex_cli_reads_it() -> None:
    responses, _ = replay(FLOWS / "pool-exhausted-usage-limit.mitm")
    limited = responses[2]
    assert limited.status_code == 429
    error = limited.json()["error"]
    assert error["type"] == "usage_limit_reached" and isinstance(error["resets_at"], int)
    # The earliest reset: the exhausted windows' reset, at most 7 days ahead.
    assert 7 * 86400 - 60 < int(limited.headers["retry-after"]) <= 7 * 86400


def test_rate_limit_fixture_carries_the_headers() -> None:
    recorded = client_flow(FLOWS / "rate-limits-headers.mitm").response
    assert recorded is not None
    assert recorded.headers["x-codex-primary-used-percent"] == "42"


def test_cycle_serves_the_recording_again_and_again() -> None:
    sessions = load_sessions([FLOWS / "codex-cli-http.mitm"])
    recorded = client_flow(FLOWS / "codex-cli-http.mitm")
    with ThreadedReplayServer(sessions, cycle=True, message_timeout=5) as server:
        with (
            ProxyProcess(
                "--mode",
                f"reverse:http://127.0.0.1:{server.port}",
                "--set",
                "connection_strategy=lazy",
                "--set",
                f"bridge_accounts={ACCOUNTS}",
                "--set",
                "bridge_session_idle_ttl=0",
            ) as proxy,
            httpx.Client(trust_env=False, timeout=30) as client,
        ):
            for _ in range(3):
                response = client.post(
                    f"{proxy.url}{recorded.request.path}", content=recorded.request.raw_content
                )
                assert response.status_code == 200
        assert server.wait_served(3, 10)
    assert not [d for d in server.deviations if d.kind == "unexpected"]
