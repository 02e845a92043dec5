"""Regenerates the recorded fixtures in flows/ (run: .venv/bin/python scripts/make_fixtures.py).

Each fixture is one scenario run for real: the local upstream scripted to fail
the way the scenario needs, the bridge (`mitmdump -s addon/bridge.py -w …`) in
front of it with the two dummy accounts of flows/accounts.json, and one client
request. The flow file holds the client flow and every upstream session, as
any user's recording would; the tests replay them with scripts/replay.py's
server and check the bridge still does exactly what was recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from responses_ws_bridge.testing.local_upstream import Plan, ThreadedUpstream
from responses_ws_bridge.testing.proxy_process import ProxyProcess

ROOT = Path(__file__).resolve().parent.parent

FLOWS = ROOT / "flows"
ACCOUNTS = FLOWS / "accounts.json"
CAPTURE = ROOT / "tests" / "data" / "codex-cli-0.169.0" / "http-sse.json"
# Dummy credentials: the fixtures must hold no real secret (they are redacted anyway).
TOKENS = {"fixture-token-team-a": "team-a", "fixture-token-team-b": "team-b"}
FIXED = [("user-agent", "fixture-client/1.0"), ("x-request-id", "req_fixture")]
BODY = {"model": "gpt-5-codex", "input": "Say hello", "stream": True, "store": False}
FAIL_1011 = Plan(close_code=1011, close_after_events=0)


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    headers: list[tuple[str, str]]
    body: dict[str, object]
    plans: dict[str, list[Plan]] = field(default_factory=dict)


def codex_request() -> tuple[list[tuple[str, str]], dict[str, object]]:
    capture = json.loads(CAPTURE.read_text())
    skip = {"host", "content-length", "authorization"}
    headers = [(k, v) for k, v in capture["headers"] if k.lower() not in skip]
    return [*headers, ("x-request-id", "req_fixture_codex")], capture["body"]


def scenarios() -> list[Scenario]:
    codex_headers, codex_body = codex_request()
    return [
        Scenario(
            "hard-1011-retry-on-owner",
            "hard affinity (session-id): close 1011 before response.created, "
            "the retry on the owner completes",
            [*FIXED, ("session-id", "fixture-session-1")],
            BODY,
            {"team-a": [FAIL_1011]},
        ),
        Scenario(
            "soft-1011-other-account",
            "soft affinity (prompt_cache_key): close 1011, the retry on another account completes",
            FIXED,
            {**BODY, "prompt_cache_key": "fixture-cache-1"},
            {"team-a": [FAIL_1011]},
        ),
        Scenario(
            "1011-after-created",
            "close 1011 after response.created: the client gets response.failed / "
            "stream_incomplete, no replay",
            [*FIXED, ("session-id", "fixture-session-3")],
            BODY,
            {"team-a": [Plan(close_code=1011, close_after_events=2)]},
        ),
        Scenario(
            "hard-owner-keeps-failing",
            "hard owner that keeps failing with 1011: the request fails closed "
            "(502 owner_unavailable), team-b never contacted",
            [*FIXED, ("session-id", "fixture-session-4")],
            BODY,
            {"team-a": [FAIL_1011, FAIL_1011, FAIL_1011]},
        ),
        Scenario(
            "codex-cli-http",
            "a Codex CLI HTTP request (headers and body from the 0.169.0 capture) bridged cleanly",
            codex_headers,
            codex_body,
        ),
    ]


def accounts_file() -> str:
    accounts = [{"id": account, "access_token": token} for token, account in TOKENS.items()]
    return json.dumps({"accounts": accounts}, indent=2) + "\n"


def record(scenario: Scenario, out: Path, log: Callable[[str], None]) -> None:
    with ThreadedUpstream(tokens=TOKENS) as upstream:
        for account, plans in scenario.plans.items():
            upstream.script(*plans, account=account)
        with ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{upstream.port}",
            "--set",
            "connection_strategy=lazy",
            "--set",
            f"bridge_accounts={ACCOUNTS}",
            "-w",
            str(out),
        ) as proxy:
            with httpx.Client(trust_env=False, timeout=30) as client:
                response = client.post(
                    f"{proxy.url}/v1/responses", headers=scenario.headers, json=scenario.body
                )
            proxy.stop()
    log(f"{out.name}: HTTP {response.status_code}, {len(upstream.records())} upstream sessions")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FLOWS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ACCOUNTS.write_text(accounts_file())
    index = []
    for scenario in scenarios():
        record(scenario, args.out / f"{scenario.name}.mitm", print)
        index.append(f"- `{scenario.name}.mitm`: {scenario.what}")
    (args.out / "README.md").write_text(
        "# Recorded fixtures\n\n"
        "Made by `scripts/make_fixtures.py` (the bridge with `-w` in front of the scripted "
        "local upstream, accounts in `accounts.json`, dummy tokens); replayed by "
        "`tests/test_replay_fixtures.py`.\n\n" + "\n".join(index) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
