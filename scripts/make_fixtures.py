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
    http_error_body,
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
V1 = "/v1/responses"
COMPACT = "/v1/responses/compact"
CODEX_PATH = "/backend-api/codex/responses"


@dataclass(frozen=True)
class Call:
    """One more client request: a POST of `body` to `path`, or a GET when `body` is None."""

    headers: list[tuple[str, str]]
    body: dict[str, object] | None
    path: str = V1


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    headers: list[tuple[str, str]]
    body: dict[str, object]
    plans: dict[str, list[Plan]] = field(default_factory=dict)
    # Requests after the first, in order, on the same bridge.
    more: list[Request | Call] = field(default_factory=list)
    path: str = V1
    args: list[str] = field(default_factory=lambda: list(LAZY))
    accounts: Path = ACCOUNTS
    oauth: dict[str, str] | None = None
    default_plan: Plan | None = None
    # The first request is a WebSocket client sending the body as `response.create`.
    websocket: bool = False

    def calls(self) -> list[Call]:
        first = Call(self.headers, self.body, self.path)
        return [first, *(c if isinstance(c, Call) else Call(*c) for c in self.more)]

    def spec(self) -> dict[str, object]:
        # Every access token the fake endpoint may issue in a fixture's few refreshes.
        logins = (self.oauth or {}).values()
        tokens = {access_token_for(a, n): a for a in logins for n in (1, 2, 3)}
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
            "close 1011 after response.created and the first output event: the client gets "
            "response.failed / stream_incomplete, no replay",
            [*FIXED, ("session-id", "fixture-session-3")],
            BODY,
            {"team-a": [Plan(close_code=1011, close_after_events=3)]},
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
        *round_two_scenarios(),
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
            more=[Call(compact, {"model": "gpt-5-codex", "input": "Say hello"}, COMPACT)],
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


# -- round two: what the Codex backend and client do (issue #19) ------------------------------


def error_frame(code: str | None, status: int, type_: str, message: str) -> dict[str, object]:
    return {
        "type": "error",
        "status": status,
        "error": {"type": type_, "code": code, "message": message, "param": None},
    }


OVERLOADED = error_frame(
    "server_is_overloaded", 500, "server_error", "Our servers are currently overloaded."
)
INVALID_API_KEY = error_frame(
    "invalid_api_key", 401, "invalid_request_error", "Your authentication token is not valid."
)
SESSION_ENDED = error_frame(None, 401, "authentication_error", "Your session has ended.")
ENCRYPTED = error_frame(
    "invalid_encrypted_content",
    400,
    "invalid_request_error",
    "The encrypted content for item rs_fixture could not be verified.",
)
# The second shape of an error frame: `status_code`, the error under `body.error`, and a
# `headers` map carrying every rate-limit family Codex CLI reads.
USAGE_LIMIT_FRAME: dict[str, object] = {
    "type": "error",
    "status_code": 429,
    "body": {
        "error": {
            "type": "usage_limit_reached",
            "code": "usage_limit_reached",
            "message": "The usage limit has been reached",
            "resets_at": RESET_AT,
        }
    },
    "headers": {
        "retry-after": 30,
        "x-codex-primary-used-percent": 100,
        "x-codex-primary-window-minutes": 300,
        "x-codex-primary-reset-at": RESET_AT,
        "x-codex-bengalfox-primary-used-percent": 40,
        "x-codex-bengalfox-limit-name": "gpt-5.2-codex-sonic",
        "x-codex-credits-has-credits": False,
        "x-codex-credits-unlimited": False,
        "x-codex-promo-message": "Upgrade for higher limits",
    },
}
CONNECTION_LIMIT_429 = {**connection_limit_event(), "status": 429}
VENDOR_EVENTS: tuple[tuple[int, dict[str, object]], ...] = (
    (
        1,
        {
            "type": "response.metadata",
            "headers": {"x-codex-turn-state": "ts-fixture-metadata"},
            "metadata": {"openai_verification_recommendation": []},
        },
    ),
    (1, {"type": "codex.response.metadata", "server_model": "gpt-5-codex"}),
    (2, {"type": "responsesapi.websocket_timing", "timing_metrics": {"queue_ms": 3}}),
)
ANSWER_HEADERS = {
    "x-reasoning-included": "true",
    "x-models-etag": 'W/"fixture-models-1"',
    "openai-model": "gpt-5-codex-2026-02-06",
}
PREWARM = {**BODY, "input": [], "generate": False}


def round_two_scenarios() -> list[Scenario]:
    session = [*FIXED, ("session-id", "fixture-session-r2")]
    soft = {**BODY, "prompt_cache_key": "fixture-cache-r2"}
    return [
        Scenario(
            "prewarm-resend-same-account",
            "a prewarm (generate: false) whose socket drops right after response.created, "
            "with no retry budget: sent once more on the same account, free; the next turn "
            "reuses the socket",
            session,
            PREWARM,
            {"team-a": [Plan(drop_after_events=1)]},
            more=[(session, BODY)],
            args=[*LAZY, "--set", "bridge_retry_budget=0"],
        ),
        Scenario(
            "vendor-events-by-path",
            "response.metadata, codex.response.metadata and responsesapi.websocket_timing "
            "around response.created: /v1 gets none of them, Codex's path gets the metadata; "
            "the metadata's x-codex-turn-state reaches both as a header",
            session,
            BODY,
            more=[Call([*FIXED, ("session-id", "fixture-session-r2b")], BODY, CODEX_PATH)],
            default_plan=Plan(extra_events=VENDOR_EVENTS),
        ),
        Scenario(
            "handshake-answer-headers",
            "the 101's x-reasoning-included, x-models-etag and openai-model reach the "
            "client's HTTP response",
            FIXED,
            BODY,
            default_plan=Plan(headers=ANSWER_HEADERS),
        ),
        Scenario(
            "error-frame-shapes",
            "an error frame with status_code, body.error and a headers map of several "
            "rate-limit families: the hard session gets the 429 usage_limit_reached with "
            "every family; websocket_connection_limit_reached with status 429 is a new "
            "socket, not a rate limit",
            session,
            BODY,
            {
                "team-a": [Plan(error=USAGE_LIMIT_FRAME)],
                "team-b": [Plan(error=CONNECTION_LIMIT_429, error_turn=2)],
            },
            more=[
                ([*FIXED, ("session-id", "fixture-session-r2c")], BODY),
                ([*FIXED, ("session-id", "fixture-session-r2c")], BODY),
            ],
        ),
        Scenario(
            "overload-after-created",
            "soft affinity, server_is_overloaded right after response.created and "
            "in_progress: they were held back, so the request is retried on the other "
            "account and the client sees one clean stream",
            FIXED,
            soft,
            {"team-a": [Plan(error=OVERLOADED, error_after_events=2)]},
        ),
        Scenario(
            "codex-keepalive-before-created",
            "a long upstream queue before response.created: Codex's path gets codex.keepalive "
            "events (its idle timer ignores comments), /v1 gets nothing until the events",
            [*FIXED, ("session-id", "fixture-session-r2d")],
            BODY,
            more=[Call([*FIXED, ("session-id", "fixture-session-r2e")], BODY, V1)],
            path=CODEX_PATH,
            default_plan=Plan(delay_s=1.2),
            args=[*LAZY, "--set", "bridge_sse_keepalive=0.3"],
        ),
        Scenario(
            "pool-exhausted-usage-limit",
            "both accounts report a window at 100 %: the next request is answered 429 "
            "usage_limit_reached (Retry-After: the earliest reset) without an upstream; the "
            "pooled usage answer at /backend-api/wham/usage says the limit is reached",
            FIXED,
            BODY,
            more=[
                (FIXED, BODY),
                (FIXED, BODY),
                Call(FIXED, None, "/backend-api/wham/usage"),
            ],
            default_plan=Plan(rate_limits=rate_limits_event(100, reset_at=RESET_AT)),
        ),
        Scenario(
            "auth-error-refresh",
            "a ChatGPT account answered invalid_api_key in the stream: its token is "
            "refreshed and the request sent again on it with the new token",
            [*FIXED, ("session-id", "fixture-session-r2f")],
            BODY,
            {"team-c": [Plan(error=INVALID_API_KEY)]},
            accounts=REFRESH_ACCOUNTS,
            oauth=REFRESH_LOGINS,
        ),
        Scenario(
            "auth-error-fail-over",
            "soft affinity, authentication_error in the stream on an account without a "
            "refresh token: that account is disabled and the other one serves",
            FIXED,
            soft,
            {"team-a": [Plan(error=SESSION_ENDED)]},
        ),
        Scenario(
            "encrypted-content-not-moved",
            "soft affinity, invalid_encrypted_content: reported with its code, never moved "
            "to the other account (only the producing account can read the content)",
            FIXED,
            soft,
            {"team-a": [Plan(error=ENCRYPTED)]},
        ),
        Scenario(
            "first-event-deadline",
            "an upstream that accepts the request and never answers: after "
            "bridge_first_event_timeout (1 s here) the client gets 504 upstream_timeout, "
            "no retry",
            [*FIXED, ("session-id", "fixture-session-r2g")],
            BODY,
            {"team-a": [Plan(hang=True)]},
            args=[*LAZY, "--set", "bridge_first_event_timeout=1"],
        ),
        Scenario(
            "upstream-431-answered-once",
            "the upstream refuses the handshake 431 (headers too large): the client gets the "
            "upstream's 431 once, no retry, no other account",
            [*FIXED, ("session-id", "fixture-session-r2h")],
            BODY,
            {
                "team-a": [
                    Plan(
                        reject_status=431,
                        reject_body=http_error_body(
                            431, "Request header fields too large", code="headers_too_large"
                        ),
                    )
                ]
            },
        ),
        Scenario(
            "oversized-request-400",
            "a request over the upstream frame budget (4 KiB here) is answered 400 "
            "payload_too_large before any upstream contact; the next one is served",
            FIXED,
            {**BODY, "input": "x" * 5000},
            more=[(FIXED, BODY)],
            args=[*LAZY, "--set", "bridge_upstream_frame_limit=4096"],
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
            # A fixture keeps what each client got, too (mitmproxy keeps no streamed body
            # without it).
            "--set",
            "store_streamed_bodies=true",
            "-w",
            str(out),
        ) as proxy:
            statuses = []
            with httpx.Client(trust_env=False, timeout=30) as client:
                for index, call in enumerate(scenario.calls()):
                    url = f"{proxy.url}{call.path}"
                    if index == 0 and scenario.websocket:
                        statuses.append(websocket_turn(url, call.headers, call.body or {}))
                        continue
                    if call.body is None:
                        response = client.get(url, headers=call.headers)
                    else:
                        response = client.post(url, headers=call.headers, json=call.body)
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
