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
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from harness.oauth_server import (
    FakeTokenEndpoint,
    access_token_for,
    unsigned_jwt,
)
from harness.proxy_process import ProxyProcess
from responses_ws_bridge.local.response_events import (
    TurnSpec,
    connection_limit_event,
    invalid_previous_response_event,
    rate_limits_event,
)
from responses_ws_bridge.local.upstream import Plan, ThreadedUpstream
from websockets.sync.client import connect as ws_connect

ROOT = Path(__file__).resolve().parent.parent

FLOWS = ROOT / "flows"
ACCOUNTS = FLOWS / "accounts.json"
REFRESH_ACCOUNTS = FLOWS / "accounts-refresh.json"
# What each fixture needs to replay (bridge options, accounts, the OAuth endpoint).
SPECS = FLOWS / "fixtures.json"
LAZY = ["--set", "connection_strategy=lazy"]
# A ChatGPT login whose access token expired long ago: the bridge refreshes it first.
REFRESH_LOGINS = {"rt-team-c-0": "team-c"}
EXPIRED_TOKEN = unsigned_jwt({"sub": "team-c", "exp": 1_000_000_000})
# Fixed, so that the recorded x-codex-* headers replay alike.
RESET_AT = 4102444800
CAPTURE = ROOT / "tests" / "data" / "codex-cli-0.169.0" / "http-sse.json"
# Dummy credentials: the fixtures must hold no real secret (they are redacted anyway).
TOKENS = {"fixture-token-team-a": "team-a", "fixture-token-team-b": "team-b"}
FIXED = [("user-agent", "fixture-client/1.0"), ("x-request-id", "req_fixture")]
BODY = {"model": "gpt-5-codex", "input": "Say hello", "stream": True, "store": False}
FAIL_1011 = Plan(close_code=1011, close_after_events=0)
WS_TERMINAL = {"response.completed", "response.failed", "response.incomplete", "error"}


Request = tuple[list[tuple[str, str]], dict[str, object]]


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    headers: list[tuple[str, str]]
    body: dict[str, object]
    plans: dict[str, list[Plan]] = field(default_factory=dict)
    # Requests after the first, in order, on the same bridge.
    more: list[Request] = field(default_factory=list)
    args: list[str] = field(default_factory=lambda: list(LAZY))
    accounts: Path = ACCOUNTS
    oauth: dict[str, str] | None = None
    default_plan: Plan | None = None
    # Each request's path, in order (None: all `/v1/responses`).
    paths: list[str] | None = None
    # The first request is a WebSocket client sending the body as `response.create`.
    websocket: bool = False

    def spec(self) -> dict[str, object]:
        tokens = {access_token_for(a, 1): a for a in (self.oauth or {}).values()}
        return {
            "args": self.args,
            "accounts": self.accounts.name,
            "oauth": self.oauth,
            "tokens": tokens,
        }


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
        *codex_upstream_scenarios(),
        *pool_surface_scenarios(),
    ]


def pool_surface_scenarios() -> list[Scenario]:
    """The pool as a client's whole base URL: compaction and WebSocket clients."""
    compact = [*FIXED, ("session-id", "fixture-session-compact")]
    return [
        Scenario(
            "compact-owner-after-1011",
            "hard affinity: close 1011 before response.created, retried on the owner; the "
            "session's compaction (POST /v1/responses/compact) then goes to that owner, over "
            "HTTP, with its credential",
            compact,
            BODY,
            {"team-a": [FAIL_1011]},
            more=[(compact, {"model": "gpt-5-codex", "input": "Say hello"})],
            paths=["/v1/responses", "/v1/responses/compact"],
        ),
        Scenario(
            "websocket-client-1011-before-created",
            "a WebSocket client with hard affinity: its first upstream socket closes 1011 "
            "before response.created, a new socket on the owner serves the message; the "
            "client sees one clean turn",
            [*FIXED, ("session-id", "fixture-session-ws")],
            BODY,
            {"team-a": [FAIL_1011]},
            websocket=True,
        ),
    ]


def codex_upstream_scenarios() -> list[Scenario]:
    """What the real Codex backend does, one behaviour each."""
    session = [*FIXED, ("session-id", "fixture-session-codex")]
    soft = {**BODY, "prompt_cache_key": "fixture-cache-codex"}
    return [
        Scenario(
            "rate-limits-headers",
            "a codex.rate_limits frame before response.created: its figures reach the client "
            "as x-codex-* headers, the frame itself is not relayed",
            FIXED,
            BODY,
            {"team-a": [Plan(rate_limits=rate_limits_event(42, reset_at=RESET_AT))]},
        ),
        Scenario(
            "connection-limit-new-socket",
            "hard affinity, second turn on a reused socket answered "
            "websocket_connection_limit_reached: a new socket on the owner serves it",
            session,
            BODY,
            {"team-a": [Plan(error=connection_limit_event(), error_turn=2)]},
            more=[(session, BODY)],
        ),
        Scenario(
            "handoff-1000-same-account",
            "soft affinity, close 1000 before response.created: a hand-off, retried once on "
            "the same account",
            FIXED,
            soft,
            {"team-a": [Plan(close_code=1000)]},
        ),
        Scenario(
            "drop-1006-same-account",
            "soft affinity, connection dropped (1006) before any event: account-neutral, "
            "retried on the same account",
            FIXED,
            soft,
            {"team-a": [Plan(drop_after_events=0)]},
        ),
        Scenario(
            "keepalive-1011-lost-connection",
            "soft affinity, an upstream that accepts the turn and then answers nothing, not "
            "even pings: the bridge's own keepalive gives up (1011 sent by the bridge), a "
            "lost connection, account-neutral: retried on the same account",
            FIXED,
            soft,
            {"team-a": [Plan(stall_after_events=0)]},
            args=[*LAZY, "--set", "bridge_ping_interval=0.2", "--set", "bridge_ping_timeout=0.2"],
        ),
        Scenario(
            "every-account-once",
            "soft affinity, 1011 on team-a then on team-b: the first account is tried again "
            "and serves",
            FIXED,
            soft,
            {"team-a": [FAIL_1011], "team-b": [FAIL_1011]},
        ),
        Scenario(
            "output-items-json",
            "a non-streaming request answered with response.completed output []: the JSON "
            "answer carries the output_item.done items",
            FIXED,
            {**BODY, "stream": False},
            default_plan=Plan(turn=TurnSpec(completed_output=False)),
        ),
        Scenario(
            "previous-response-invalid",
            "the upstream's other shape of an unknown previous_response_id (no code, "
            "message Invalid `previous_response_id`.): the client gets previous_response_not_found",
            FIXED,
            {**BODY, "previous_response_id": "resp_fixture_unknown"},
            {"team-a": [Plan(error=invalid_previous_response_event())]},
        ),
        Scenario(
            "token-refresh",
            "a ChatGPT account whose access token expired: refreshed at the OAuth endpoint "
            "before the handshake, which carries the new token",
            FIXED,
            BODY,
            accounts=REFRESH_ACCOUNTS,
            oauth=REFRESH_LOGINS,
        ),
        Scenario(
            "reverse-default-strategy",
            "reverse mode without --set connection_strategy=lazy: bridged all the same",
            FIXED,
            BODY,
            args=[],
        ),
        Scenario(
            "codex-session-one-socket",
            "a Codex session (prewarm, then two turns whose x-codex-turn-state differs) "
            "carried by one upstream socket",
            session,
            {**BODY, "generate": False},
            more=[
                ([*session, ("x-codex-turn-state", "ts-fixture")], BODY),
                ([*session, ("x-codex-turn-state", "ts-fixture-2")], BODY),
            ],
            default_plan=Plan(turn_state="ts-fixture"),
        ),
    ]


def accounts_file() -> str:
    accounts = [{"id": account, "access_token": token} for token, account in TOKENS.items()]
    return json.dumps({"accounts": accounts}, indent=2) + "\n"


def refresh_accounts_file() -> str:
    (refresh_token, account), *_ = REFRESH_LOGINS.items()
    accounts = [{"id": account, "access_token": EXPIRED_TOKEN, "refresh_token": refresh_token}]
    return json.dumps({"accounts": accounts}, indent=2) + "\n"


def record(scenario: Scenario, out: Path, log: Callable[[str], None]) -> None:
    with (
        ThreadedUpstream(tokens=TOKENS) as upstream,
        FakeTokenEndpoint(scenario.oauth or {}, on_issue=upstream.add_token) as oauth,
        tempfile.TemporaryDirectory() as scratch,
    ):
        if scenario.default_plan is not None:
            upstream.default_plan = scenario.default_plan
        for account, plans in scenario.plans.items():
            upstream.script(*plans, account=account)
        # A copy: the refresher writes its state file beside the accounts file.
        accounts = Path(scratch) / scenario.accounts.name
        shutil.copy(scenario.accounts, accounts)
        with ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{upstream.port}",
            *scenario.args,
            "--set",
            f"bridge_accounts={accounts}",
            "--set",
            f"bridge_oauth_token_url={oauth.url}",
            "-w",
            str(out),
        ) as proxy:
            statuses = []
            requests = [(scenario.headers, scenario.body), *scenario.more]
            paths = scenario.paths or ["/v1/responses"] * len(requests)
            with httpx.Client(trust_env=False, timeout=30) as client:
                for index, ((headers, body), path) in enumerate(zip(requests, paths, strict=True)):
                    if index == 0 and scenario.websocket:
                        statuses.append(websocket_turn(proxy.url + path, headers, body))
                        continue
                    response = client.post(f"{proxy.url}{path}", headers=headers, json=body)
                    statuses.append(response.status_code)
            proxy.stop()
    log(f"{out.name}: HTTP {statuses}, {len(upstream.records())} upstream sessions")


def websocket_turn(url: str, headers: list[tuple[str, str]], body: dict[str, object]) -> int:
    """One `response.create` over a WebSocket client, read to its terminal event; 101."""
    message = {"type": "response.create", **body}
    with ws_connect(
        url.replace("http://", "ws://", 1),
        additional_headers=headers,
        user_agent_header=None,
        compression=None,
        open_timeout=30,
    ) as ws:
        ws.send(json.dumps(message))
        while json.loads(ws.recv(timeout=30))["type"] not in WS_TERMINAL:
            pass
    return 101


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FLOWS)
    parser.add_argument(
        "--only", metavar="NAME", help="record this scenario alone (the others stay as they are)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ACCOUNTS.write_text(accounts_file())
    REFRESH_ACCOUNTS.write_text(refresh_accounts_file())
    index = []
    specs = {}
    if SPECS.exists():
        specs = json.loads(SPECS.read_text())
    for scenario in scenarios():
        if args.only is None or args.only == scenario.name:
            record(scenario, args.out / f"{scenario.name}.mitm", print)
        index.append(f"- `{scenario.name}.mitm`: {scenario.what}")
        specs[f"{scenario.name}.mitm"] = scenario.spec()
    SPECS.write_text(json.dumps(specs, indent=2) + "\n")
    (args.out / "README.md").write_text(
        "# Recorded fixtures\n\n"
        "Made by `scripts/make_fixtures.py` (the bridge with `-w` in front of the scripted "
        "local upstream, accounts in `accounts.json`, dummy tokens); replayed by "
        "`tests/e2e/test_replay_fixtures.py`, with what `fixtures.json` says each needs "
        "(bridge options, accounts file, the fake OAuth endpoint's logins).\n\n"
        + "\n".join(index)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
