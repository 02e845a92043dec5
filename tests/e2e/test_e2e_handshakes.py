"""End to end: every request goes out on a handshake made for it or for its own session.

Connections made ahead (`bridge_preconnect`) carry TCP and TLS only; the
logging upstream sees each session's own upgrade, with its session id, and
every `response.create` on the socket that upgrade opened.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.proxy_process import ProxyProcess
from responses_ws_bridge.local.upstream import ConnectionRecord, ThreadedUpstream

from tests.support.http import client

UPSTREAM_TOKENS = {"tok-team-a": "team-a", "tok-team-b": "team-b"}
CLIENT_KEY = "client-key-1"
# In pass-through mode the client brings a credential the upstream knows.
CLIENT_TOKEN = "tok-team-a"
SESSIONS = 6
# One client: the same originator and User-Agent, a new session id per session.
CLIENT = {"originator": "codex_exec", "user-agent": "codex_exec/0.169.0 (Linux; x86_64)"}


@pytest.fixture(scope="module")
def accounts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("accounts") / "accounts.json"
    accounts = [{"id": i, "access_token": f"tok-{i}"} for i in ("team-a", "team-b")]
    path.write_text(json.dumps({"accounts": accounts, "client_keys": [CLIENT_KEY]}))
    return path


def bridge(upstream: ThreadedUpstream, *extra: str) -> ProxyProcess:
    return ProxyProcess(
        "--mode",
        f"reverse:http://127.0.0.1:{upstream.port}",
        "--set",
        "bridge_preconnect=1",
        *extra,
    )


@pytest.fixture
def pooled(upstream: ThreadedUpstream, accounts_file: Path) -> Iterator[ProxyProcess]:
    with bridge(upstream, "--set", f"bridge_accounts={accounts_file}") as proxy:
        yield proxy


@pytest.fixture
def passthrough(upstream: ThreadedUpstream) -> Iterator[ProxyProcess]:
    with bridge(upstream) as proxy:
        yield proxy


def run_sessions(proxy: ProxyProcess, key: str, turns: int) -> None:
    with client() as http:
        for n in range(SESSIONS):
            session = f"sess-{n}"
            headers = {**CLIENT, "authorization": f"Bearer {key}", "session-id": session}
            for turn in range(turns):
                body = {"model": "m", "input": f"{session} turn {turn}", "stream": True}
                response = http.post(f"{proxy.url}/v1/responses", json=body, headers=headers)
                assert response.status_code == 200, response.text
                assert b"response.completed" in response.content


def handshakes(upstream: ThreadedUpstream) -> list[ConnectionRecord]:
    return [r for r in upstream.records() if r.status is not None]


def assert_each_create_on_its_own_handshake(records: list[ConnectionRecord]) -> None:
    for record in records:
        session = record.header("session-id")
        assert session is not None, f"a handshake without the session's id: {record.headers}"
        creates = [m.data for m in record.messages if isinstance(m.data, dict)]
        assert creates, "a socket that carried no request"
        for create in creates:
            assert create["input"].startswith(f"{session} "), (session, create["input"])


def test_pool_mode_sends_every_session_on_its_own_handshake(
    upstream: ThreadedUpstream, pooled: ProxyProcess
) -> None:
    run_sessions(pooled, CLIENT_KEY, turns=2)
    records = handshakes(upstream)
    assert_each_create_on_its_own_handshake(records)
    # One socket per session, each reused for its second turn.
    assert sorted(r.header("session-id") or "" for r in records) == sorted(
        f"sess-{n}" for n in range(SESSIONS)
    )
    assert all(
        r.header("authorization") in ("Bearer tok-team-a", "Bearer tok-team-b") for r in records
    )


def test_pass_through_opens_one_socket_per_new_session_with_the_clients_credential(
    upstream: ThreadedUpstream, passthrough: ProxyProcess
) -> None:
    run_sessions(passthrough, CLIENT_TOKEN, turns=1)
    records = handshakes(upstream)
    assert len(records) == SESSIONS
    assert_each_create_on_its_own_handshake(records)
    assert all(r.header("authorization") == f"Bearer {CLIENT_TOKEN}" for r in records)
