"""End to end: what the real Codex upstream does, played by the local upstream, through mitmdump.

Rate-limit frames and headers, the socket age limit, close codes that are not
the account's fault, every account tried once, `output: []` completions,
unknown previous responses, token refresh, reverse mode without extra flags,
and one socket per Codex session.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness.oauth_server import (
    FakeTokenEndpoint,
    access_token_for,
    unsigned_jwt,
)
from harness.proxy_process import ProxyProcess
from mitmproxy import http as mitm_http
from mitmproxy import io as mitm_io
from responses_ws_bridge.core.sse import parse_sse
from responses_ws_bridge.local.ports import free_port
from responses_ws_bridge.local.response_events import (
    TurnSpec,
    connection_limit_event,
    invalid_previous_response_event,
    rate_limits_event,
)
from responses_ws_bridge.local.upstream import Plan, ThreadedUpstream

from tests.support.http import client

TOKENS = {"tok-team-a": "team-a", "tok-team-b": "team-b"}
RESET_AT = int(time.time()) + 3600


def accounts(path: Path, *entries: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"accounts": list(entries)}))
    return path


def two_accounts(tmp_path: Path) -> Path:
    return accounts(
        tmp_path / "accounts.json",
        {"id": "team-a", "access_token": "tok-team-a"},
        {"id": "team-b", "access_token": "tok-team-b"},
    )


@pytest.fixture
def upstream() -> Iterator[ThreadedUpstream]:
    with ThreadedUpstream(tokens=TOKENS) as server:
        yield server


def bridge(upstream: ThreadedUpstream, accounts_file: Path, *extra: str) -> ProxyProcess:
    return ProxyProcess(
        "--mode",
        f"reverse:http://127.0.0.1:{upstream.port}",
        "--set",
        f"bridge_accounts={accounts_file}",
        *extra,
    )


def post(
    proxy: ProxyProcess, body: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    with client() as http:
        return http.post(f"{proxy.url}/v1/responses", json=body, headers=headers or {})


def stream(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-5-codex", "input": "hi", "stream": True, **extra}


def event_types(response: httpx.Response) -> list[str]:
    return [json.loads(data)["type"] for _, data in parse_sse(response.content)]


def accounts_of(upstream: ThreadedUpstream) -> list[str | None]:
    return [r.account for r in upstream.records()]


# -- 1. rate limits ----------------------------------------------------------------------


def test_rate_limit_frames_become_response_headers_and_are_not_relayed(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    frame = rate_limits_event(42, reset_at=RESET_AT, secondary_used=7)
    upstream.script(Plan(rate_limits=frame), account="team-a")
    with bridge(upstream, two_accounts(tmp_path)) as proxy:
        response = post(proxy, stream())
    assert response.status_code == 200
    assert response.headers["x-codex-primary-used-percent"] == "42"
    assert response.headers["x-codex-primary-window-minutes"] == "300"
    assert response.headers["x-codex-primary-reset-at"] == str(RESET_AT)
    assert response.headers["x-codex-secondary-used-percent"] == "7"
    assert response.headers["x-codex-credits-has-credits"] == "false"
    assert "codex.rate_limits" not in event_types(response)
    assert event_types(response)[-1] == "response.completed"


def test_an_exhausted_account_is_not_chosen_and_the_most_headroom_wins(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    accounts_file = accounts(
        tmp_path / "accounts.json",
        {"id": "team-a", "access_token": "tok-team-a"},
        {"id": "team-b", "access_token": "tok-team-b"},
    )
    upstream.script(Plan(rate_limits=rate_limits_event(100, reset_at=RESET_AT)), account="team-a")
    upstream.script(Plan(rate_limits=rate_limits_event(30, reset_at=RESET_AT)), account="team-b")
    with bridge(upstream, accounts_file, "--set", "bridge_session_idle_ttl=0") as proxy:
        assert post(proxy, stream()).status_code == 200  # team-a: now at 100 %
        first = post(proxy, stream())
        assert first.status_code == 200
        assert first.headers["x-codex-primary-used-percent"] == "30"
        for _ in range(2):
            assert post(proxy, stream()).status_code == 200
    assert accounts_of(upstream) == ["team-a", "team-b", "team-b", "team-b"]


def test_an_error_frames_headers_are_the_accounts_figures(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    error = {
        **connection_limit_event(),
        "headers": {"x-codex-primary-used-percent": "42", "x-codex-primary-reset-at": "1"},
    }
    upstream.script(Plan(error=error), account="team-a")
    with bridge(upstream, two_accounts(tmp_path)) as proxy:
        response = post(proxy, stream())
    assert response.status_code == 200
    assert accounts_of(upstream) == ["team-a", "team-a"]
    assert response.headers["x-codex-primary-used-percent"] == "42"


def test_another_accounts_figures_are_never_sent(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    error = {
        "type": "error",
        "status": 429,
        "error": {"type": "usage_limit_reached", "code": "usage_limit_reached", "message": "x"},
        "headers": {
            "x-codex-primary-used-percent": "100",
            "x-codex-primary-window-minutes": "300",
            "x-codex-primary-reset-at": str(RESET_AT),
        },
    }
    upstream.script(Plan(error=error), account="team-a")
    with bridge(upstream, two_accounts(tmp_path)) as proxy:
        response = post(proxy, stream())
    assert response.status_code == 200
    # Moved to team-b, whose figures are unknown: team-a's are not sent as if they were its.
    assert accounts_of(upstream) == ["team-a", "team-b"]
    assert "x-codex-primary-used-percent" not in response.headers


# -- 2. connection age ---------------------------------------------------------------------


def test_connection_limit_error_opens_a_new_socket_on_the_owner(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    session = {"session-id": "sess-age-1"}
    upstream.script(Plan(error=connection_limit_event(), error_turn=2), account="team-a")
    with bridge(upstream, two_accounts(tmp_path), "--set", "bridge_retry_budget=0") as proxy:
        assert post(proxy, stream(), session).status_code == 200
        second = post(proxy, stream(), session)
    assert second.status_code == 200
    assert "error" not in event_types(second)
    records = upstream.records()
    assert [r.account for r in records] == ["team-a", "team-a"]
    assert len(records[0].messages) == 2  # the reused socket got the second turn, and said no


def test_idle_sockets_older_than_the_max_age_are_not_reused(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    session = {"session-id": "sess-age-2"}
    with bridge(upstream, two_accounts(tmp_path), "--set", "bridge_session_max_age=0.001") as proxy:
        for _ in range(2):
            assert post(proxy, stream(), session).status_code == 200
    assert len(upstream.records()) == 2


# -- 3. close codes that are not the account's fault ------------------------------------


def test_close_1000_before_created_is_a_handoff_retried_on_the_same_account(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    upstream.script(Plan(close_code=1000), account="team-a")
    with bridge(upstream, two_accounts(tmp_path), "--set", "bridge_retry_budget=0") as proxy:
        response = post(proxy, stream(prompt_cache_key="pck-1000"))
    assert response.status_code == 200
    assert accounts_of(upstream) == ["team-a", "team-a"]


def test_1006_without_an_event_gives_no_strike(upstream: ThreadedUpstream, tmp_path: Path) -> None:
    upstream.script(*[Plan(drop_after_events=0), Plan()] * 4, account="team-a")
    with bridge(upstream, two_accounts(tmp_path), "--set", "bridge_session_idle_ttl=0") as proxy:
        for _ in range(4):
            assert post(proxy, stream(prompt_cache_key="pck-1006")).status_code == 200
    # Each drop retried on team-a; four drops in a row never cooled it down.
    assert accounts_of(upstream) == ["team-a"] * 8


def test_the_bridges_own_keepalive_1011_is_a_lost_connection(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    upstream.script(Plan(stall_after_events=0), account="team-a")
    out = tmp_path / "flows.mitm"
    with bridge(
        upstream,
        two_accounts(tmp_path),
        "--set",
        "bridge_ping_interval=0.2",
        "--set",
        "bridge_ping_timeout=0.2",
        "-w",
        str(out),
    ) as proxy:
        response = post(proxy, stream(prompt_cache_key="pck-keepalive"))
        proxy.stop()
    assert response.status_code == 200
    # Soft affinity stays: a lost connection says nothing against team-a.
    assert accounts_of(upstream) == ["team-a", "team-a"]
    with out.open("rb") as f:
        flows = [fl for fl in mitm_io.FlowReader(f).stream() if isinstance(fl, mitm_http.HTTPFlow)]
    (client_flow,) = [f for f in flows if f.metadata["responses_bridge"]["role"] == "client"]
    first = client_flow.metadata["responses_bridge"]["attempts"][0]
    assert (first["outcome"], first["close_code"]) == ("connection_lost", 1011)
    upstream_flows = [f for f in flows if f.metadata["responses_bridge"]["role"] == "upstream"]
    assert "connection lost" in upstream_flows[0].metadata["responses_bridge"]["connection_lost"]


# -- 4. every account tried once ------------------------------------------------------------


def test_after_every_account_failed_once_the_first_is_tried_again(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    upstream.script(Plan(close_code=1011), account="team-a")
    upstream.script(Plan(close_code=1011), account="team-b")
    with bridge(upstream, two_accounts(tmp_path)) as proxy:
        response = post(proxy, stream(prompt_cache_key="pck-once"))
    assert response.status_code == 200
    assert accounts_of(upstream) == ["team-a", "team-b", "team-a"]


def test_hard_affinity_never_starts_over_elsewhere(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    upstream.script(*[Plan(close_code=1011)] * 3, account="team-a")
    with bridge(upstream, two_accounts(tmp_path)) as proxy:
        response = post(proxy, stream(), {"session-id": "sess-once"})
    assert response.status_code == 502
    assert set(accounts_of(upstream)) == {"team-a"}


# -- 5. output: [] completions -------------------------------------------------------------


def test_non_streaming_answer_is_assembled_from_output_items(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    upstream.default_plan = Plan(turn=TurnSpec(text="Hello there.", completed_output=False))
    with bridge(upstream, two_accounts(tmp_path)) as proxy:
        response = post(proxy, {"model": "gpt-5-codex", "input": "hi"})
    assert response.status_code == 200
    output = response.json()["output"]
    assert output[0]["content"][0]["text"] == "Hello there."


# -- 6. unknown previous responses ---------------------------------------------------------


@pytest.mark.parametrize("shape", ["code", "message"])
def test_unknown_previous_response_keeps_its_canonical_code(
    upstream: ThreadedUpstream, tmp_path: Path, shape: str
) -> None:
    if shape == "message":
        upstream.script(Plan(error=invalid_previous_response_event()), account="team-a")
    with bridge(upstream, two_accounts(tmp_path)) as proxy:
        response = post(proxy, stream(previous_response_id="resp_unknown"))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "previous_response_not_found"
    assert response.json()["error"]["param"] == "previous_response_id"


def test_an_incomplete_response_gets_no_owner(upstream: ThreadedUpstream, tmp_path: Path) -> None:
    """Only a completed, delivered response binds its id to the account that made it."""
    half_full = rate_limits_event(50, reset_at=RESET_AT)
    upstream.script(
        Plan(turn=TurnSpec(terminal="incomplete"), rate_limits=half_full), account="team-a"
    )
    with bridge(upstream, two_accounts(tmp_path)) as proxy:
        first = post(proxy, stream())
        assert event_types(first)[-1] == "response.incomplete"
        response_id = json.loads(parse_sse(first.content)[0][1])["response"]["id"]
        post(proxy, stream(previous_response_id=response_id))
    # Unowned, the follow-up goes where the headroom is (team-b), not to team-a.
    assert accounts_of(upstream) == ["team-a", "team-b"]


# -- 7. token refresh ------------------------------------------------------------------------


def refresh_accounts(tmp_path: Path, access_token: str = "") -> Path:
    entry: dict[str, Any] = {"id": "team-c", "refresh_token": "rt-team-c-0"}
    if access_token:
        entry["access_token"] = access_token
    return accounts(tmp_path / "accounts.json", entry)


EXPIRED = unsigned_jwt({"sub": "team-c", "exp": 1_000_000_000})


def test_expired_token_is_refreshed_persisted_and_reused_after_restart(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    file = refresh_accounts(tmp_path, EXPIRED)
    with FakeTokenEndpoint({"rt-team-c-0": "team-c"}, on_issue=upstream.add_token) as oauth:
        args = ("--set", f"bridge_oauth_token_url={oauth.url}")
        with bridge(upstream, file, *args) as proxy:
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda _: post(proxy, stream()), range(4)))
            log = proxy.log()
        assert [a.status_code for a in answers] == [200] * 4
        assert oauth.refreshes == 1  # one refresh for four concurrent requests
        assert oauth.requests[0] == {
            "grant_type": "refresh_token",
            "client_id": "app_EMoamEEZ73f0CkXaXp7hrann",
            "refresh_token": "rt-team-c-0",
            "scope": "openid profile email",
        }
        state = tmp_path / "accounts.tokens.json"
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
        stored = json.loads(state.read_text())["accounts"]["team-c"]
        assert stored["refresh_token"] == "rt-team-c-1"
        assert {r.header("authorization") for r in upstream.records()} == {
            f"Bearer {access_token_for('team-c', 1)}"
        }
        for secret in ("rt-team-c-0", "rt-team-c-1", access_token_for("team-c", 1)):
            assert secret not in log
        # A restart uses the rotated tokens: no refresh, and never the spent one.
        with bridge(upstream, file, *args) as proxy:
            assert post(proxy, stream()).status_code == 200
        assert oauth.refreshes == 1
        assert oauth.reuses == 0


def test_a_handshake_401_refreshes_and_retries_once(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    file = refresh_accounts(tmp_path, "opaque-stale-token")
    with FakeTokenEndpoint({"rt-team-c-0": "team-c"}, on_issue=upstream.add_token) as oauth:
        with bridge(upstream, file, "--set", f"bridge_oauth_token_url={oauth.url}") as proxy:
            response = post(proxy, stream(), {"session-id": "sess-401"})
        assert response.status_code == 200
        assert oauth.refreshes == 1
    assert [r.status for r in upstream.records()] == [401, 101]


def test_a_refused_refresh_disables_the_account_for_good(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    file = refresh_accounts(tmp_path, EXPIRED)
    with FakeTokenEndpoint({}, refuse="refresh_token_reused") as oauth:
        args = ("--set", f"bridge_oauth_token_url={oauth.url}")
        with bridge(upstream, file, *args) as proxy:
            first = post(proxy, stream())
            log = proxy.log()
        assert first.status_code in (502, 503)
        assert "rt-team-c-0" not in first.text and "rt-team-c-0" not in log
        assert "refresh_token_reused" in log
        with bridge(upstream, file, *args) as proxy:
            second = post(proxy, stream())
        assert second.status_code == 503
        assert oauth.refreshes == 1  # the refused token is never sent again
    assert upstream.records() == []


# -- 8. reverse mode without extra flags -----------------------------------------------------


def test_reverse_mode_works_without_connection_strategy(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    with bridge(upstream, two_accounts(tmp_path)) as proxy:
        assert post(proxy, stream()).status_code == 200
        assert "connection_strategy set to lazy" in proxy.log()


def test_a_dead_upstream_in_reverse_mode_is_a_502_with_an_openai_body(tmp_path: Path) -> None:
    dead = free_port()
    with ProxyProcess(
        "--mode",
        f"reverse:http://127.0.0.1:{dead}",
        "--set",
        f"bridge_accounts={two_accounts(tmp_path)}",
    ) as proxy:
        response = post(proxy, stream())
    assert response.status_code == 502
    assert set(response.json()["error"]) >= {"message", "type", "code"}


# -- 9. one socket per Codex session ---------------------------------------------------------


def test_a_codex_session_keeps_one_socket_while_its_turn_state_changes(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    upstream.default_plan = Plan(turn_state="ts-1")
    session = {"session-id": "sess-codex", "thread-id": "sess-codex"}
    with bridge(upstream, two_accounts(tmp_path)) as proxy:
        prewarm = post(proxy, stream(generate=False), session)
        turn_state = prewarm.headers["x-codex-turn-state"]
        for n in range(2):
            headers = {**session, "x-codex-turn-state": f"{turn_state}-{n}"}
            assert post(proxy, stream(), headers).status_code == 200
    (record,) = upstream.records()
    assert len(record.messages) == 3
