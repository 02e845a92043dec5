"""The recorded fixtures in flows/, replayed through the bridge as regression tests.

Each fixture's upstream sessions are served by the replay server; the bridge
runs in front of it with the fixture accounts; the recorded client request is
sent again. The client must see what it saw when the fixture was recorded, and
the replay server must see exactly the recorded handshakes and messages.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from mitmproxy import http
from mitmproxy import io as mitm_io
from responses_ws_bridge.core.sse import parse_sse
from responses_ws_bridge.recording.replay import ThreadedReplayServer, load_sessions
from responses_ws_bridge.testing.proxy_process import ProxyProcess

from tests.support.data import ROOT

FLOWS = ROOT / "flows"
ACCOUNTS = FLOWS / "accounts.json"
FIXTURES = sorted(p.name for p in FLOWS.glob("*.mitm"))
SEED_BUG = ROOT / "tests" / "support" / "seed_bug.py"


def tokens() -> dict[str, str]:
    config = json.loads(ACCOUNTS.read_text())
    return {a["access_token"]: a["id"] for a in config["accounts"]}


def client_flow(path: Path) -> http.HTTPFlow:
    with path.open("rb") as f:
        flows = [fl for fl in mitm_io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
    (flow,) = [f for f in flows if f.metadata.get("responses_bridge", {}).get("role") == "client"]
    return flow


def replay(fixture: Path, *extra: str) -> tuple[httpx.Response, ThreadedReplayServer]:
    sessions = load_sessions([fixture])
    recorded = client_flow(fixture)
    with ThreadedReplayServer(sessions, tokens=tokens(), message_timeout=5) as server:
        with ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{server.port}",
            "--set",
            "connection_strategy=lazy",
            "--set",
            f"bridge_accounts={ACCOUNTS}",
            *extra,
        ) as proxy:
            headers = [
                (k, v)
                for k, v in recorded.request.headers.items(multi=True)
                if k.lower() not in {"host", "content-length"}
            ]
            with httpx.Client(trust_env=False, timeout=30) as client:
                response = client.post(
                    f"{proxy.url}{recorded.request.path}",
                    headers=headers,
                    content=recorded.request.raw_content,
                )
            proxy.stop()  # idle sessions close, as they did when recorded
        server.wait_served(len(sessions), 10)
    return response, server


def test_fixtures_exist() -> None:
    assert set(FIXTURES) == {
        "hard-1011-retry-on-owner.mitm",
        "soft-1011-other-account.mitm",
        "1011-after-created.mitm",
        "hard-owner-keeps-failing.mitm",
        "codex-cli-http.mitm",
    }


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_replays_with_no_deviation(name: str) -> None:
    fixture = FLOWS / name
    recorded = client_flow(fixture)
    response, server = replay(fixture)
    assert [str(d) for d in server.deviations] == []
    assert len(server.served) == len(server.server.sessions) > 0
    assert recorded.response is not None
    assert response.status_code == recorded.response.status_code
    if response.headers.get("content-type") == "text/event-stream":
        got = [(t, json.loads(d)["type"]) for t, d in parse_sse(response.content)]
        want = [(t, json.loads(d)["type"]) for t, d in parse_sse(recorded.response.content or b"")]
        assert got == want
    else:
        assert (
            response.json()["error"]["code"]
            == json.loads(recorded.response.content or b"")["error"]["code"]
        )


def test_fixture_catches_the_seed_bug() -> None:
    """With the owner wrongly excluded after 1011, the retry goes to team-b: a deviation."""
    _, server = replay(FLOWS / "hard-1011-retry-on-owner.mitm", "-s", str(SEED_BUG))
    deviations = [str(d) for d in server.deviations]
    # Sessions count from 0: the retry (the second session) went to the wrong account.
    assert "session 1: account changed: expected 'team-a', got 'team-b'" in deviations


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
