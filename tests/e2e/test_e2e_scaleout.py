"""Two `mitmdump` instances on one real Valkey store, in front of one local upstream.

The instances' accounts files list the same accounts in opposite orders, so
that left alone each would choose a different account for a new request:
whatever agrees across them came from the store.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness.bench_scaleout import (
    SETUPS,
    ScaleoutSpec,
    format_scaleout,
    measure_scaleout,
)
from harness.proxy_process import ProxyProcess
from responses_ws_bridge.core.sse import parse_sse
from responses_ws_bridge.local.ports import free_port
from responses_ws_bridge.local.response_events import rate_limit_event
from responses_ws_bridge.local.state_server import StateServer
from responses_ws_bridge.local.upstream import Plan, ThreadedUpstream

from tests.support.http import client

UPSTREAM_TOKENS = {"tok-team-a": "team-a", "tok-team-b": "team-b"}
UNAVAILABLE_LOG = "unavailable ("
BACK_LOG = "is reachable again"

# Each test starts two mitmdump processes (a few seconds).
pytestmark = pytest.mark.timeout(90)


def accounts_file(directory: Path, *ids: str) -> Path:
    path = directory / f"accounts-{'-'.join(ids)}.json"
    accounts = [{"id": i, "access_token": f"tok-{i}"} for i in ids]
    path.write_text(json.dumps({"accounts": accounts}))
    return path


class Pair:
    """Instance one lists team-a first, instance two team-b first."""

    def __init__(self, upstream: ThreadedUpstream, store_url: str, directory: Path) -> None:
        self.metrics_port = free_port()
        self.one = self._proxy(upstream, store_url, accounts_file(directory, "team-a", "team-b"))
        self.two = self._proxy(upstream, store_url, accounts_file(directory, "team-b", "team-a"))
        self.one.args += ["--set", f"bridge_metrics=127.0.0.1:{self.metrics_port}"]

    @staticmethod
    def _proxy(upstream: ThreadedUpstream, store_url: str, accounts: Path) -> ProxyProcess:
        return ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{upstream.port}",
            "--set",
            "connection_strategy=lazy",
            "--set",
            f"bridge_accounts={accounts}",
            "--set",
            f"bridge_state={store_url}",
        )

    def __enter__(self) -> Pair:
        self.one.start()
        try:
            self.two.start()
        except BaseException:
            self.one.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.one.close()
        self.two.close()


def post(
    proxy: ProxyProcess, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    with client() as http:
        response = http.post(f"{proxy.url}/v1/responses", json=body, headers=headers or {})
    return response.status_code, response.content


def stream_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-5-codex", "input": "hi", "stream": True, **extra}


def accounts_of(upstream: ThreadedUpstream) -> list[str | None]:
    return [r.account for r in upstream.records()]


@pytest.fixture(scope="module")
def store() -> Iterator[StateServer]:
    with StateServer() as server:
        yield server


@pytest.fixture(scope="module")
def pair(
    upstream: ThreadedUpstream, store: StateServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    """Shared by the affinity tests, which use keys of their own."""
    with Pair(upstream, f"{store.url}/0/affinity", tmp_path_factory.mktemp("pair")) as p:
        yield p


def test_a_hard_session_bound_on_one_instance_is_honoured_by_the_other(
    pair: Pair, upstream: ThreadedUpstream
) -> None:
    assert post(pair.one, stream_body(), {"session-id": "e2e-hard-1"})[0] == 200
    assert post(pair.two, stream_body(), {"session-id": "e2e-hard-1"})[0] == 200
    assert post(pair.one, stream_body(), {"session-id": "e2e-hard-1"})[0] == 200
    assert accounts_of(upstream) == ["team-a"] * 2  # the second turn on one reused its socket
    # Instance two's first choice for a new session is team-b: only the store said team-a.
    assert post(pair.two, stream_body(), {"session-id": "e2e-hard-2"})[0] == 200
    assert accounts_of(upstream)[-1] == "team-b"


def test_previous_response_id_is_routed_to_its_owner_from_the_other_instance(
    pair: Pair, upstream: ThreadedUpstream
) -> None:
    owners: dict[str, str] = {}
    # Two responses: unbound requests take turns, so usually one on each account.
    for _ in range(2):
        status, body = post(pair.one, stream_body())
        assert status == 200
        response_id = json.loads(parse_sse(body)[-1][1])["response"]["id"]
        owner = upstream.owner_of(response_id)
        assert owner is not None
        owners[response_id] = owner
    for response_id, owner in owners.items():
        upstream.reset()
        status, body = post(pair.two, stream_body(previous_response_id=response_id))
        assert status == 200, body
        assert accounts_of(upstream) == [owner]


def test_concurrent_first_requests_of_one_key_on_both_instances_end_with_one_owner(
    pair: Pair, upstream: ThreadedUpstream
) -> None:
    keys = [f"e2e-race-{i}" for i in range(4)]
    gate = threading.Barrier(2 * len(keys), timeout=20)
    statuses: list[int] = []

    def one(proxy: ProxyProcess, key: str) -> None:
        gate.wait()
        statuses.append(post(proxy, stream_body(), {"session-id": key})[0])

    threads = [
        threading.Thread(target=one, args=(proxy, key))
        for key in keys
        for proxy in (pair.one, pair.two)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert statuses == [200] * len(threads)
    for key in keys:
        owners = {r.account for r in upstream.records() if r.header("session-id") == key}
        assert len(owners) == 1, (key, owners)


def test_metrics_are_scraped_without_secrets(pair: Pair) -> None:
    assert post(pair.one, stream_body(), {"session-id": "e2e-metrics-secret"})[0] == 200
    response = httpx.get(f"http://127.0.0.1:{pair.metrics_port}/metrics", timeout=5)
    assert response.status_code == 200
    text = response.text
    assert 'bridge_requests_total{affinity="hard",outcome="response.completed"}' in text
    assert 'bridge_account_health{account="team-a",state="healthy"} 1.0' in text
    assert "bridge_time_to_first_event_seconds_bucket" in text
    assert "e2e-metrics-secret" not in text and "tok-team" not in text


def test_a_cooldown_one_instance_saw_keeps_the_other_away(
    upstream: ThreadedUpstream, store: StateServer, tmp_path: Path
) -> None:
    with Pair(upstream, f"{store.url}/0/cooldown", tmp_path) as fresh:
        # A session bound to team-a through instance one; its next turn, through
        # instance two (a new socket there), is refused with a rate limit.
        assert post(fresh.one, stream_body(), {"session-id": "cool"})[0] == 200
        upstream.script(Plan(error=rate_limit_event(60)), account="team-a")
        status, _ = post(fresh.two, stream_body(), {"session-id": "cool"})
        assert status == 429
        upstream.reset()
        # Instance one never saw the 429, and team-a is its first choice.
        for i in range(3):
            assert post(fresh.one, stream_body())[0] == 200
            assert post(fresh.one, stream_body(), {"session-id": f"cool-{i}"})[0] == 200
        status, _ = post(fresh.one, stream_body(), {"session-id": "cool"})
        assert status == 429  # the owner is cooling on every instance
        assert set(accounts_of(upstream)) == {"team-b"}


def test_store_killed_mid_run(upstream: ThreadedUpstream, tmp_path: Path) -> None:
    with StateServer() as store, Pair(upstream, store.url, tmp_path) as fresh:
        assert post(fresh.one, stream_body(), {"session-id": "known-to-one"})[0] == 200
        store.kill()
        # No affinity: served from local state.
        assert post(fresh.two, stream_body())[0] == 200
        # A hard session whose owner instance two cannot read: 503, never another account.
        status, body = post(fresh.two, stream_body(), {"session-id": "known-to-one"})
        assert status == 503
        assert json.loads(body)["error"]["code"] == "state_store_unavailable"
        status, body = post(fresh.one, stream_body(), {"session-id": "brand-new"})
        assert status == 503
        assert accounts_of(upstream) == ["team-a", "team-b"]
        # The owner instance one already knows still serves (on its idle socket).
        assert post(fresh.one, stream_body(), {"session-id": "known-to-one"})[0] == 200
        assert accounts_of(upstream) == ["team-a", "team-b"]
        assert len(upstream.records(account="team-a")[0].messages) == 2
        for _ in range(3):
            post(fresh.two, stream_body(), {"session-id": "known-to-one"})
        # Said once per instance, not per request.
        assert fresh.two.log().count(UNAVAILABLE_LOG) == 1
        assert fresh.one.log().count(UNAVAILABLE_LOG) == 1
        # Back (empty, as a crashed store returns): new hard sessions are served again.
        store.start()
        new_session = {"session-id": "after"}
        assert _eventually(lambda: post(fresh.two, stream_body(), new_session)[0] == 200)
        assert BACK_LOG in fresh.two.log()
        # Instance one re-offers the owner it knows; instance two then finds it.
        assert post(fresh.one, stream_body(), {"session-id": "known-to-one"})[0] == 200
        upstream.reset()
        assert post(fresh.two, stream_body(), {"session-id": "known-to-one"})[0] == 200
        assert accounts_of(upstream) == ["team-a"]


def _eventually(check: Any, timeout: float = 15.0) -> bool:
    """Backoff decides when an instance probes the store again: poll, bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_the_scaleout_benchmark_runs_every_setup_without_errors() -> None:
    doc = measure_scaleout(ScaleoutSpec.smoke())
    for setup in SETUPS:
        figures = doc["results"][setup]
        assert figures["errors"] == 0, figures
        assert figures["turns"] == 4 * 2
        assert figures["events_per_s"] > 0
    assert doc["results"]["two_store"]["instances"] == 2
    assert doc["two_vs_one_events_per_s"] > 0
    assert "2 instances, one shared store" in format_scaleout(doc)
