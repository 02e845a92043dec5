"""Soak: many sessions through the real bridge while the upstream injects faults (`make soak`).

Asserts that nothing is lost (every request gets exactly one outcome), nothing
is mixed up (each completed response was produced for that very request),
no hard session is ever served by two accounts, and the proxy's memory and
file descriptors come back to their baseline once the load is gone.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from harness.proxy_process import ProxyProcess
from responses_ws_bridge.core.sse import parse_sse
from responses_ws_bridge.local.upstream import Plan, ThreadedUpstream

from tests.support.http import client

pytestmark = pytest.mark.slow

ACCOUNTS = ("team-a", "team-b", "team-c")
TOKENS = {f"tok-{a}": a for a in ACCOUNTS}
CLIENT_KEY = "soak-client-key"
SESSIONS = 48
TURNS = 4
WORKERS = 8
FAULTS = [
    Plan(close_code=1011, close_after_events=0),  # retried before any event
    Plan(drop_after_events=0),
    Plan(close_code=1011, close_after_events=3),  # mid-stream: stream_incomplete
    Plan(close_code=1001, close_after_events=0),
]


def proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open file descriptors) of a process."""
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedUpstream]:
    with ThreadedUpstream(tokens=TOKENS) as server:
        yield server


@pytest.fixture(scope="module")
def bridge(
    upstream: ThreadedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    path = tmp_path_factory.mktemp("soak") / "accounts.json"
    accounts = [{"id": a, "access_token": f"tok-{a}"} for a in ACCOUNTS]
    path.write_text(json.dumps({"accounts": accounts, "client_keys": [CLIENT_KEY]}))
    with ProxyProcess(
        "--mode",
        f"reverse:http://127.0.0.1:{upstream.port}",
        "--set",
        f"bridge_accounts={path}",
        "--set",
        "bridge_session_idle_ttl=1",
        "--set",
        "bridge_record=false",
    ) as proxy:
        yield proxy


def turn(bridge: ProxyProcess, session: int, number: int) -> dict[str, Any]:
    marker = f"soak-{session}-{number}"
    hard = session % 3 != 0
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    body: dict[str, Any] = {"model": "gpt-5-codex", "input": marker, "stream": True}
    if hard:
        headers["session-id"] = f"soak-session-{session}"
    else:
        body["prompt_cache_key"] = f"soak-cache-{session}"
    with client(timeout=60) as http:
        response = http.post(f"{bridge.url}/v1/responses", json=body, headers=headers)
    outcome: dict[str, Any] = {"marker": marker, "hard": hard, "status": response.status_code}
    if response.status_code == 200:
        events = parse_sse(response.content)
        outcome["terminal"] = events[-1][0] if events else None
        created = [json.loads(d) for t, d in events if t == "response.created"]
        outcome["response_id"] = created[0]["response"]["id"] if created else None
    else:
        outcome["error"] = response.json()["error"]["code"]
    return outcome


def test_soak_with_injected_faults(bridge: ProxyProcess, upstream: ThreadedUpstream) -> None:
    assert bridge.proc is not None
    pid = bridge.proc.pid
    turn(bridge, 0, 0)  # warm up: imports, first sockets
    time.sleep(2)  # idle sockets of the warm-up reaped (idle TTL 1 s)
    base_rss, base_fds = proc_status(pid)

    rng = random.Random(7)
    lock = threading.Lock()
    outcomes: list[dict[str, Any]] = []

    def session(n: int) -> None:
        for t in range(TURNS):
            if rng.random() < 0.3:
                upstream.script(rng.choice(FAULTS))
            result = turn(bridge, n, t)
            with lock:
                outcomes.append(result)

    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(session, range(1, SESSIONS + 1)))
    elapsed = time.monotonic() - started

    # Nothing lost: one outcome per request, each a terminal event or an OpenAI-style error.
    assert len(outcomes) == SESSIONS * TURNS
    for outcome in outcomes:
        if outcome["status"] == 200:
            assert outcome["terminal"] in ("response.completed", "response.failed"), outcome
        else:
            assert outcome["status"] in (429, 502, 503), outcome
    completed = [o for o in outcomes if o.get("terminal") == "response.completed"]
    assert len(completed) > len(outcomes) // 2

    # Nothing mixed up: each response was produced for the request that got it.
    by_response: dict[str, str] = {}
    for record in upstream.records():
        # A reused socket carries several turns: each response answers the last
        # response.create received before it started.
        creates = [
            (m.received_at, m.data.get("input"))
            for m in record.messages
            if isinstance(m.data, dict) and m.data.get("type") == "response.create"
        ]
        for event in record.events:
            response = event.event.get("response")
            if event.event.get("type") == "response.created" and isinstance(response, dict):
                before = [given for at, given in creates if at <= event.sent_at]
                by_response[response["id"]] = str(before[-1]) if before else ""
    for outcome in completed:
        assert by_response.get(outcome["response_id"]) == outcome["marker"], outcome

    # No hard-affinity violation: a hard session's responses all come from one account.
    owners: dict[str, set[str | None]] = {}
    for outcome in completed:
        if outcome["hard"]:
            session_id = outcome["marker"].rsplit("-", 1)[0]
            owners.setdefault(session_id, set()).add(upstream.owner_of(outcome["response_id"]))
    assert all(len(accounts) == 1 for accounts in owners.values()), owners

    # Back to baseline once idle sockets are reaped.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rss, fds = proc_status(pid)
        if fds <= base_fds + 2 and rss <= base_rss + 32 * 1024:
            break
        time.sleep(0.5)
    rss, fds = proc_status(pid)
    kinds = sorted({str(o.get("terminal") or o.get("error")) for o in outcomes})
    counts = {
        k: sum(1 for o in outcomes if str(o.get("terminal") or o.get("error")) == k) for k in kinds
    }
    # The figures `make soak -s` shows (nothing here holds a secret).
    print(
        f"\nsoak: {len(outcomes)} requests in {elapsed:.1f} s, outcomes {counts}, "
        f"RSS {base_rss} -> {rss} KiB, fds {base_fds} -> {fds}"
    )
    assert fds <= base_fds + 2, (base_fds, fds)
    assert rss <= base_rss + 32 * 1024, (base_rss, rss)
