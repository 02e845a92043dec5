"""End to end with an account pool: affinity, the 1011 rules, session reuse, client keys."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.proxy_process import ProxyProcess
from responses_ws_bridge.core.sse import parse_sse
from responses_ws_bridge.local.upstream import Plan, ThreadedUpstream

from tests.support.http import client, header_values

UPSTREAM_TOKENS = TOKENS = {"tok-team-a": "team-a", "tok-team-b": "team-b"}
CLIENT_KEY = "client-key-1"


def accounts_json(*ids: str) -> str:
    accounts = [{"id": i, "access_token": f"tok-{i}"} for i in ids]
    return json.dumps({"accounts": accounts, "client_keys": [CLIENT_KEY]})


@pytest.fixture(scope="module")
def accounts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("accounts") / "accounts.json"
    path.write_text(accounts_json("team-a", "team-b"))
    return path


@pytest.fixture
def bridge(upstream: ThreadedUpstream, accounts_file: Path) -> Iterator[ProxyProcess]:
    """A fresh bridge per test: account health and bindings start clean."""
    with ProxyProcess(
        "--mode",
        f"reverse:http://127.0.0.1:{upstream.port}",
        "--set",
        "connection_strategy=lazy",
        "--set",
        f"bridge_accounts={accounts_file}",
    ) as proxy:
        yield proxy


def post(
    bridge: ProxyProcess,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    key: str | None = CLIENT_KEY,
) -> tuple[int, bytes]:
    all_headers = {"authorization": f"Bearer {key}"} if key else {}
    all_headers.update(headers or {})
    with client() as http:
        response = http.post(f"{bridge.url}/v1/responses", json=body, headers=all_headers)
    return response.status_code, response.content


def stream_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-5-codex", "input": "hi", "stream": True, **extra}


def accounts_of(upstream: ThreadedUpstream) -> list[str | None]:
    return [r.account for r in upstream.records()]


def test_hard_session_1011_retries_on_the_owner(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    # First request binds the key; both accounts are idle, so it lands on team-a.
    upstream.script(Plan(close_code=1011, close_after_events=0), account="team-a")
    status, body = post(bridge, stream_body(), {"session-id": "hard-1"})
    assert status == 200
    assert [t for t, _ in parse_sse(body)][-1] == "response.completed"
    assert accounts_of(upstream) == ["team-a", "team-a"]
    assert upstream.records(account="team-b") == []
    first, second = upstream.records()
    assert first.close_code == 1011 and second.event_types[-1] == "response.completed"


def test_hard_owner_that_keeps_failing_fails_closed(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    upstream.script(*[Plan(close_code=1011, close_after_events=0)] * 3, account="team-a")
    status, body = post(bridge, stream_body(), {"session-id": "hard-2"})
    assert status == 502
    assert json.loads(body)["error"]["code"] == "owner_unavailable"
    # The first attempt and the two retries, all on the owner; team-b never contacted.
    assert accounts_of(upstream) == ["team-a"] * 3


def test_previous_response_id_goes_to_the_account_that_produced_it(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    # A soft request whose first account fails with 1011 is served by team-b.
    upstream.script(Plan(close_code=1011, close_after_events=0), account="team-a")
    status, body = post(bridge, stream_body(prompt_cache_key="soft-prev"))
    assert status == 200
    produced_by = upstream.records()[-1].account
    assert produced_by == "team-b"
    completed = json.loads(parse_sse(body)[-1][1])
    response_id = completed["response"]["id"]
    assert upstream.owner_of(response_id) == produced_by
    upstream.reset()
    status, body = post(bridge, stream_body(previous_response_id=response_id))
    assert status == 200, body
    assert accounts_of(upstream) == [produced_by]


def test_soft_1011_moves_to_another_account(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    upstream.script(Plan(close_code=1011, close_after_events=0), account="team-a")
    status, body = post(bridge, stream_body(prompt_cache_key="soft-1"))
    assert status == 200
    assert [t for t, _ in parse_sse(body)][-1] == "response.completed"
    assert accounts_of(upstream) == ["team-a", "team-b"]


def test_1011_after_output_is_stream_incomplete_without_replay(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    # created, in_progress, then the first output event: the client has seen events.
    upstream.script(Plan(close_code=1011, close_after_events=3), account="team-a")
    upstream.script(Plan(close_code=1011, close_after_events=3), account="team-b")
    status, body = post(bridge, stream_body(), {"session-id": "hard-after"})
    assert status == 200
    last_type, last_data = parse_sse(body)[-1]
    assert last_type == "response.failed"
    assert json.loads(last_data)["response"]["error"]["code"] == "stream_incomplete"
    assert len(upstream.records()) == 1


def test_1011_after_created_but_before_output_is_retried_unseen(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    # response.created and in_progress were held back: the client saw nothing.
    upstream.script(Plan(close_code=1011, close_after_events=2), account="team-a")
    status, body = post(bridge, stream_body(), {"session-id": "hard-held"})
    assert status == 200
    types = [t for t, _ in parse_sse(body)]
    assert types.count("response.created") == 1 and types[-1] == "response.completed"
    assert len(upstream.records()) == 2


def test_sequential_turns_of_one_key_reuse_one_socket(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    for _ in range(3):
        status, _ = post(bridge, stream_body(), {"session-id": "reuse-1"})
        assert status == 200
    (record,) = upstream.records()
    assert len(record.messages) == 3
    assert record.event_types.count("response.completed") == 3


def test_concurrent_turns_of_one_key_get_their_own_sockets_on_one_account(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    # Paced turns take seconds, so the two requests are in flight together.
    upstream.script(Plan(pace_s=0.2), Plan(pace_s=0.2))
    gate = threading.Barrier(2, timeout=10)
    statuses: list[int] = []

    def one() -> None:
        gate.wait()
        statuses.append(post(bridge, stream_body(), {"session-id": "concurrent-1"})[0])

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert statuses == [200, 200]
    first, second = upstream.records()
    assert first.account == second.account
    assert first.messages and second.messages


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_client_keys_are_required(
    bridge: ProxyProcess, upstream: ThreadedUpstream, key: str | None
) -> None:
    status, body = post(bridge, stream_body(), key=key)
    assert status == 401
    assert json.loads(body)["error"]["code"] == "invalid_client_key"
    assert upstream.records() == []


def test_pool_credentials_replace_the_clients(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    status, _ = post(bridge, stream_body(), {"chatgpt-account-id": "client-acct"})
    assert status == 200
    (record,) = upstream.records()
    assert header_values(record.headers, "authorization") == [f"Bearer tok-{record.account}"]
    assert CLIENT_KEY not in json.dumps(record.headers)
    assert header_values(record.headers, "chatgpt-account-id") == []


def test_accounts_file_edits_are_picked_up(upstream: ThreadedUpstream, tmp_path: Path) -> None:
    path = tmp_path / "accounts.json"
    path.write_text(accounts_json("team-a"))
    with ProxyProcess(
        "--mode",
        f"reverse:http://127.0.0.1:{upstream.port}",
        "--set",
        "connection_strategy=lazy",
        "--set",
        f"bridge_accounts={path}",
    ) as proxy:
        assert post(proxy, stream_body())[0] == 200
        path.write_text(accounts_json("team-b"))
        # The reload is asynchronous (polled each second): wait for the log line.
        assert _wait_log(proxy, "bridge accounts reloaded: team-b", 10)
        upstream.reset()
        assert post(proxy, stream_body())[0] == 200
        assert accounts_of(upstream) == ["team-b"]
        path.write_text('{"accounts": [{"id": "x"}]}')
        assert _wait_log(proxy, "accounts[0]", 10)
        upstream.reset()
        assert post(proxy, stream_body())[0] == 200  # the previous pool stays in force
        assert accounts_of(upstream) == ["team-b"]


def test_bad_accounts_file_is_a_clear_startup_error(tmp_path: Path) -> None:
    path = tmp_path / "accounts.json"
    path.write_text('{"accounts": [{"id": "a", "access_token": "t"}, {"api_key": "k"}]}')
    proxy = ProxyProcess("--set", f"bridge_accounts={path}")
    with pytest.raises(RuntimeError) as raised:
        proxy.start()
    proxy.close()
    assert "accounts[1].id" in str(raised.value)
    assert '"k"' not in str(raised.value)


def _wait_log(proxy: ProxyProcess, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proxy.log():
            return True
        time.sleep(0.05)
    return False
