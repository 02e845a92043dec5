"""End to end: a pool with client keys in reverse mode is a client's whole base URL.

Compaction, models, one response and the side endpoints go upstream with the
chosen account's credential, by the same affinity as the turns; a wrong key
reaches nothing; the logging upstream sees no client key, ever.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from harness.proxy_process import ProxyProcess
from responses_ws_bridge.core.sse import parse_sse
from responses_ws_bridge.local.response_events import TurnSpec
from responses_ws_bridge.local.upstream import ConnectionRecord, HttpPlan, Plan, ThreadedUpstream

from tests.support.data import load_capture
from tests.support.http import client

UPSTREAM_TOKENS = {"tok-team-a": "team-a", "tok-team-b": "team-b"}
CLIENT_KEY = "client-key-surface-1"
CODEX = "/backend-api/codex"


@pytest.fixture(scope="module")
def accounts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("accounts") / "accounts.json"
    accounts = [{"id": i, "access_token": f"tok-{i}"} for i in ("team-a", "team-b")]
    path.write_text(json.dumps({"accounts": accounts, "client_keys": [CLIENT_KEY]}))
    return path


def pooled_bridge(upstream: ThreadedUpstream, accounts_file: Path) -> ProxyProcess:
    return ProxyProcess(
        "--mode",
        f"reverse:http://127.0.0.1:{upstream.port}",
        "--set",
        f"bridge_accounts={accounts_file}",
    )


@pytest.fixture(scope="module")
def bridge(upstream: ThreadedUpstream, accounts_file: Path) -> Iterator[ProxyProcess]:
    """One bridge for the module: each test uses session ids of its own."""
    with pooled_bridge(upstream, accounts_file) as proxy:
        yield proxy


def assert_no_client_key_left(upstream: ThreadedUpstream) -> None:
    """The logging upstream saw account credentials only: never the client's key."""
    for record in upstream.records():
        assert CLIENT_KEY not in json.dumps(record.headers), record
        assert CLIENT_KEY.encode() not in record.body, record
        assert record.header("authorization") in ("Bearer tok-team-a", "Bearer tok-team-b")


def codex_request(session: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Codex CLI's captured request (ChatGPT backend, HTTP), as a session of its own."""
    capture = load_capture("backend-api-codex-http-sse.json")
    skip = {"host", "content-length", "authorization"}
    headers = {k: v for k, v in capture["headers"] if k.lower() not in skip}
    for name in ("session-id", "thread-id", "x-client-request-id"):
        headers[name] = session
    headers["authorization"] = f"Bearer {CLIENT_KEY}"
    body = {**capture["body"], "prompt_cache_key": session}
    return headers, body


def compaction_body(turn_body: dict[str, Any]) -> dict[str, Any]:
    """What Codex CLI posts to `…/responses/compact`: the turn's context, no streaming."""
    keep = ("model", "input", "tools", "parallel_tool_calls", "reasoning")
    return {k: turn_body[k] for k in keep if k in turn_body}


def test_a_codex_http_session_turns_and_compaction_land_on_one_account(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    headers, body = codex_request("codex-surface-1")
    with client() as http:
        for _ in range(2):
            turn = http.post(f"{bridge.url}{CODEX}/responses", headers=headers, json=body)
            assert turn.status_code == 200, turn.text
            assert parse_sse(turn.content)[-1][0] == "response.completed"
        compacted = http.post(
            f"{bridge.url}{CODEX}/responses/compact", headers=headers, json=compaction_body(body)
        )
    assert compacted.status_code == 200, compacted.text
    answer = compacted.json()
    assert answer["object"] == "response.compaction"
    assert answer["output"][-1]["type"] == "compaction"
    records = upstream.records()
    assert [(r.method, r.path) for r in records] == [
        ("GET", f"{CODEX}/responses"),
        ("POST", f"{CODEX}/responses/compact"),
    ]
    assert len({r.account for r in records}) == 1
    (socket, compact) = records
    assert len(socket.messages) == 2  # both turns on the session's one socket
    assert json.loads(compact.body) == compaction_body(body)
    # The session's own headers went with it, the client's credential did not.
    assert compact.header("session-id") == "codex-surface-1"
    assert compact.header("originator") == "codex_exec"
    assert_no_client_key_left(upstream)


def test_a_hard_compaction_stays_on_its_owner_when_the_owner_is_rate_limited(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    headers, body = codex_request("codex-surface-2")
    with client() as http:
        assert (
            http.post(f"{bridge.url}/v1/responses", headers=headers, json=body).status_code == 200
        )
        owner = upstream.records()[0].account
        upstream.script_http(
            HttpPlan(429, headers={"retry-after": "3", "x-codex-primary-used-percent": "100"}),
            account=owner,
        )
        compacted = http.post(
            f"{bridge.url}/v1/responses/compact", headers=headers, json=compaction_body(body)
        )
    assert compacted.status_code == 429
    assert compacted.headers["retry-after"] == "3"
    # Only the owner was asked: its compaction could not be read back anywhere else.
    assert {r.account for r in upstream.records()} == {owner}
    assert_no_client_key_left(upstream)


def sdk(proxy: ProxyProcess, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{proxy.url}/v1",
        api_key=key,
        max_retries=0,
        timeout=20,
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )


def test_the_openai_sdk_creates_retrieves_compacts_and_lists_models(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    api = sdk(bridge)
    created = api.responses.create(
        model="gpt-5-codex", input="remember this", prompt_cache_key="sdk-1"
    )
    producer = upstream.owner_of(created.id)
    retrieved = api.responses.retrieve(created.id)
    assert (retrieved.id, retrieved.status) == (created.id, "completed")
    items = api.responses.input_items.list(created.id)
    assert items.data and items.data[0].type == "message"
    compacted = api.responses.compact(model="gpt-5-codex", previous_response_id=created.id)
    assert compacted.object == "response.compaction"
    assert compacted.output[-1].type == "compaction"
    listed = api.models.list()
    assert [m.id for m in listed.data] == ["gpt-5-codex"]
    records = upstream.records()
    # Every read and the compaction went to the account that produced the response.
    assert [(r.method, r.account) for r in records if r.method != "GET" or r.status != 101][:3] == [
        ("GET", producer),
        ("GET", producer),
        ("POST", producer),
    ]
    assert_no_client_key_left(upstream)


def test_a_fleet_starting_together_costs_one_models_call(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    gate = threading.Barrier(8, timeout=10)
    statuses: list[int] = []
    path = f"{CODEX}/models?client_version=0.169.0&fleet=1"

    def one() -> None:
        gate.wait()
        with client() as http:
            got = http.get(f"{bridge.url}{path}", headers={"authorization": f"Bearer {CLIENT_KEY}"})
        statuses.append(got.status_code)
        assert got.json()["models"][0]["slug"] == "gpt-5-codex"

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert statuses == [200] * 8
    assert [r.path for r in upstream.records()] == [path]
    with client() as http:
        # A client that holds the cached version gets a 304, still without an upstream call.
        again = http.get(
            f"{bridge.url}{path}",
            headers={"authorization": f"Bearer {CLIENT_KEY}", "if-none-match": '"models-1"'},
        )
    assert again.status_code == 304
    assert len(upstream.records()) == 1


def test_objects_of_a_side_endpoint_stay_with_the_sessions_account(
    bridge: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    headers, body = codex_request("codex-surface-3")
    with client() as http:
        assert (
            http.post(f"{bridge.url}/v1/responses", headers=headers, json=body).status_code == 200
        )
        owner = upstream.records()[0].account
        uploaded = http.post(f"{bridge.url}/v1/files", headers=headers, content=b"data")
        assert uploaded.status_code == 200
        read = http.get(f"{bridge.url}/v1/files/{uploaded.json()['id']}", headers=headers)
        assert read.status_code == 200
    assert [r.account for r in upstream.records()] == [owner] * 3
    assert_no_client_key_left(upstream)


def test_an_unknown_response_is_looked_for_on_each_account_once(
    upstream: ThreadedUpstream, accounts_file: Path
) -> None:
    with pooled_bridge(upstream, accounts_file) as first:
        # team-a fails the soft request with 1011: team-b produces the response.
        upstream.script(Plan(close_code=1011, close_after_events=0), account="team-a")
        created = sdk(first).responses.create(model="m", input="x", prompt_cache_key="probe-1")
    assert upstream.owner_of(created.id) == "team-b"
    upstream.reset()
    # A fresh bridge (another instance, or a restart) never saw who produced it.
    with pooled_bridge(upstream, accounts_file) as fresh:
        api = sdk(fresh)
        assert api.responses.retrieve(created.id).id == created.id
        assert [(r.account, r.status) for r in upstream.records()] == [
            ("team-a", 404),
            ("team-b", 200),
        ]
        upstream.reset()
        # Found once, remembered: the next read goes straight to its producer.
        assert api.responses.retrieve(created.id).id == created.id
        assert [r.account for r in upstream.records()] == ["team-b"]
        with pytest.raises(openai.NotFoundError):
            api.responses.retrieve("resp_nobody_made_this")


REQUESTS = [
    ("GET", "/v1/models", None),
    ("GET", f"{CODEX}/models?client_version=0.169.0", None),
    ("POST", "/v1/responses/compact", {"model": "m", "input": "x"}),
    ("POST", f"{CODEX}/responses/compact", {"model": "m", "input": "x"}),
    ("GET", "/v1/responses/resp_x", None),
    ("GET", "/v1/responses/resp_x/input_items", None),
    ("POST", "/v1/responses/resp_x/cancel", None),
    ("DELETE", "/v1/responses/resp_x", None),
    ("POST", "/v1/files", {"purpose": "x"}),
    ("GET", "/backend-api/wham/usage", None),
]


@pytest.mark.parametrize("key", [None, "wrong-key", "tok-team-a"])
def test_a_wrong_key_reaches_nothing_on_any_path(
    bridge: ProxyProcess, upstream: ThreadedUpstream, key: str | None
) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with client() as http:
        for method, path, body in REQUESTS:
            got = http.request(method, f"{bridge.url}{path}", headers=headers, json=body)
            assert got.status_code == 401, (method, path, got.text)
            assert got.json()["error"]["code"] == "invalid_client_key"
        upgrade = http.get(
            f"{bridge.url}/v1/responses",
            headers={
                **headers,
                "connection": "Upgrade",
                "upgrade": "websocket",
                "sec-websocket-version": "13",
                "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
        assert upgrade.status_code == 401
    assert upstream.records() == []


def test_a_destination_outside_the_trusted_hosts_gets_403_and_nothing_is_sent(
    upstream: ThreadedUpstream, accounts_file: Path
) -> None:
    with (
        ProxyProcess("--set", f"bridge_accounts={accounts_file}") as regular,
        httpx.Client(proxy=regular.url, trust_env=False, timeout=20) as http,
    ):
        got = http.get(
            f"http://127.0.0.1:{upstream.port}/v1/models",
            headers={"authorization": f"Bearer {CLIENT_KEY}"},
        )
    assert got.status_code == 403
    assert got.json()["error"]["code"] == "untrusted_upstream"
    assert upstream.records() == []


def test_a_token_the_upstream_echoes_in_an_event_reaches_no_client_flow_or_log(
    upstream: ThreadedUpstream, accounts_file: Path, tmp_path: Path
) -> None:
    secrets = ("tok-team-a", "tok-team-b", CLIENT_KEY)
    upstream.default_plan = Plan(turn=TurnSpec(text=f"echo {' '.join(secrets)} done"))
    saved = tmp_path / "flows.mitm"
    try:
        with ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{upstream.port}",
            "--set",
            f"bridge_accounts={accounts_file}",
            "--set",
            "flow_detail=4",
            "-w",
            str(saved),
        ) as proxy:
            api = sdk(proxy)
            streamed = b"".join(
                e.model_dump_json().encode()
                for e in api.responses.create(model="m", input="x", stream=True)
            )
            whole = api.responses.create(model="m", input="x").model_dump_json().encode()
            compacted = api.responses.compact(model="m", input="x")  # a forwarded exchange
            proxy.stop()  # flushes the -w file
            log = proxy.log()
    finally:
        upstream.default_plan = Plan()
    assert b"echo <redacted> <redacted> <redacted> done" in whole
    assert compacted.object == "response.compaction"
    recorded = saved.read_bytes()
    assert b"/v1/responses/compact" in recorded  # the exchange is in the -w file too
    for secret in secrets:
        for where, text in (("stream", streamed), ("json", whole), ("flows", saved.read_bytes())):
            assert secret.encode() not in text, (secret, where)
        assert secret not in log


def records_of(upstream: ThreadedUpstream, method: str) -> list[ConnectionRecord]:
    return [r for r in upstream.records() if r.method == method]
