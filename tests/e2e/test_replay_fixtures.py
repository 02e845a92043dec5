"""The recorded fixtures in flows/, replayed through the bridge as regression tests.

Each fixture's upstream sessions are served by the replay server; the bridge
runs in front of it with the fixture accounts; the recorded client request is
sent again. The client must see what it saw when the fixture was recorded, and
the replay server must see exactly the recorded handshakes and messages.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from harness import fixture_replay
from harness.fixture_replay import FLOWS, client_flows
from harness.proxy_process import ProxyProcess
from mitmproxy import http
from mitmproxy import io as mitm_io
from responses_ws_bridge.core.sse import parse_sse
from responses_ws_bridge.recording.replay import ThreadedReplayServer, load_sessions

from tests.support.data import ROOT

ACCOUNTS = FLOWS / "accounts.json"
FIXTURES = sorted(p.name for p in FLOWS.glob("*.mitm"))
SEED_BUG = ROOT / "tests" / "support" / "seed_bug.py"
# What each fixture needs to replay, written by scripts/make_fixtures.py.
SPECS = fixture_replay.specs()


def client_flow(path: Path) -> http.HTTPFlow:
    (flow,) = client_flows(path)
    return flow


def replay(
    fixture: Path, *extra: str, speed: float | None = None
) -> tuple[list[httpx.Response], ThreadedReplayServer]:
    replayed = fixture_replay.replay(fixture, *extra, speed=speed)
    assert replayed.refresh_reuses == 0
    return replayed.responses, replayed.server


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


@pytest.mark.parametrize("name", FIXTURES)
def test_a_fixture_holds_only_what_its_requests_did(name: str) -> None:
    """Every upstream flow served a client flow of the file (no flow for a socket that
    carried no request), and each streamed answer is kept on its client flow."""
    with (FLOWS / name).open("rb") as f:
        flows = [fl for fl in mitm_io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
    meta = [fl.metadata.get("responses_bridge", {}) for fl in flows]
    clients = {fl.id for fl, m in zip(flows, meta, strict=True) if m.get("role") == "client"}
    for fl, m in zip(flows, meta, strict=True):
        if m.get("role") == "upstream":
            served = set(m.get("client_flows") or [m.get("client_flow")])
            assert served and served <= clients, fl.comment
    for fl in client_flows(FLOWS / name):
        response = fl.response
        if response is not None and response.headers.get("content-type") == "text/event-stream":
            assert response.content, fl.comment


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_replays_with_no_deviation(name: str) -> None:
    """What `scripts/replay_flows.py NAME` checks (`harness.fixture_replay`)."""
    replayed = fixture_replay.replay(FLOWS / name)
    assert fixture_replay.differences(replayed) == []
    assert len(replayed.responses) == len(replayed.recorded) > 0


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
