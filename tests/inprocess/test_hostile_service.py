"""The service against a hostile upstream: who gets credentials, what reaches the client.

A real `HostileUpstream` (a `websockets` server on 127.0.0.1) misbehaves on
purpose; a recording `ClientSink` (tests/support/sink.py) takes the answer.
The tokens are plain words no pattern would take for a secret, so only the
accounts' SecretScrubber can cut them out.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from responses_ws_bridge.core.accounts import parse_accounts
from responses_ws_bridge.core.handshake_headers import UpstreamCredential
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.sse import parse_sse
from responses_ws_bridge.core.turns import Destination, Turn
from responses_ws_bridge.core.upstream_events import MAX_RESET_S
from responses_ws_bridge.core.upstream_trust import Endpoint
from responses_ws_bridge.shell.bridge_service import BridgeService, BridgeSettings
from responses_ws_bridge.shell.session_pool import SessionPool
from responses_ws_bridge.shell.upstream_client import UpstreamSettings

from tests.support.hostile_upstream import Behaviour, HostileUpstream, Hostility
from tests.support.service import no_sleep, post_turn

TOKENS = {"a": "plainwordtokenalpha", "b": "plainwordtokenbravo"}
CLIENT_BEARER = "plainwordclientbearer"
BOUND_S = 10.0
BRIDGE_LOGGERS = ("responses_ws_bridge", "responses_bridge")
STREAM = {"model": "m", "input": "hi", "stream": True}
SESSION = [("session-id", "s-1")]


@dataclass
class Rig:
    upstream: HostileUpstream
    service: BridgeService
    state: PoolState

    async def post(
        self,
        body: dict[str, Any] | None = None,
        headers: list[tuple[str, str]] | None = None,
        *,
        destination: Destination | None = None,
        reverse_target: Endpoint | None = None,
        own: tuple[Endpoint, ...] = (),
    ) -> tuple[Turn, httpx.Response]:
        return await post_turn(
            self.service,
            body or STREAM,
            headers,
            destination=destination or Destination("https", "api.openai.com", 443, "/v1/responses"),
            client_credential=(
                None if self.state.pooled else UpstreamCredential(CLIENT_BEARER, None)
            ),
            reverse_target=reverse_target,
            own_endpoints=own,
        )

    def healthy(self) -> bool:
        pool = self.state.pool
        assert pool is not None
        return all(row.health == "healthy" and row.served == 0 for row in pool.snapshot())


@asynccontextmanager
async def rig(
    *,
    pooled: bool = True,
    account_upstream: bool = True,
    retry_budget: int = 2,
    idle_s: float | None = 300.0,
    keepalive_s: float | None = None,
) -> AsyncIterator[Rig]:
    async with HostileUpstream() as upstream:
        ws_url = f"{upstream.url}/v1/responses"
        state = PoolState()
        if pooled:
            accounts = [
                {"id": a, "api_key": t, **({"upstream": ws_url} if account_upstream else {})}
                for a, t in TOKENS.items()
            ]
            state.set_accounts(parse_accounts(json.dumps({"accounts": accounts})))
        settings = BridgeSettings(
            upstream_option="" if pooled else ws_url,
            upstream=UpstreamSettings(connect_timeout=BOUND_S, ping_interval=None),
            preconnect=0,
            retry_budget=retry_budget,
            stream_idle_timeout_s=idle_s,
            sse_keepalive_s=keepalive_s,
        )
        service = BridgeService(settings, state=state, sessions=SessionPool(), sleep=no_sleep)
        try:
            yield Rig(upstream, service, state)
        finally:
            await service.shutdown()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def events(response: httpx.Response) -> list[tuple[str | None, dict[str, Any]]]:
    return [(t, json.loads(d)) for t, d in parse_sse(response.content)]


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


# --- who may receive an account's credential -------------------------------------------------


def test_a_pool_never_sends_credentials_to_a_destination_the_client_chose() -> None:
    async def main() -> None:
        async with rig(account_upstream=False) as r:
            where = Destination("http", "127.0.0.1", r.upstream.port, "/v1/responses")
            turn, response = await r.post(destination=where)
            assert response.status_code == 403
            assert error_code(response) == "untrusted_upstream"
            assert "bridge_trusted_upstreams" in response.json()["error"]["message"]
            assert r.upstream.records == []
            assert turn.report.attempts == [] and r.healthy()

    run(main())


def test_the_reverse_mode_target_is_the_operators_choice() -> None:
    async def main() -> None:
        async with rig(account_upstream=False) as r:
            where = Destination("http", "127.0.0.1", r.upstream.port, "/v1/responses")
            _, response = await r.post(
                destination=where, reverse_target=Endpoint("127.0.0.1", r.upstream.port)
            )
            assert response.status_code == 200
            assert len(r.upstream.records) == 1

    run(main())


def test_accounts_with_their_own_upstream_ignore_the_destination() -> None:
    async def main() -> None:
        async with rig() as r:
            where = Destination("http", "evil.example", 80, "/v1/responses")
            _, response = await r.post(destination=where)
            assert response.status_code == 200

    run(main())


@pytest.mark.parametrize("pooled", [True, False])
def test_the_proxy_itself_is_never_an_upstream(pooled: bool) -> None:
    async def main() -> None:
        async with rig(pooled=pooled) as r:
            r.service.settings = BridgeSettings(upstream_option="")
            own = Endpoint("0.0.0.0", 8080)
            where = Destination("http", "localhost", 8080, "/v1/responses")
            _, response = await r.post(destination=where, own=(own,))
            assert response.status_code == 403
            assert "this proxy itself" in response.json()["error"]["message"]
            assert r.upstream.records == []

    run(main())


def test_an_account_upstream_aimed_at_the_proxy_itself_is_never_contacted() -> None:
    async def main() -> None:
        async with rig() as r:
            # The accounts' upstream is the hostile server's port: call it this proxy's own.
            port = int(r.upstream.url.rsplit(":", 1)[1])
            turn, response = await r.post(own=(Endpoint("127.0.0.1", port),))
            assert response.status_code == 502
            assert r.upstream.records == []
            assert {a.detail for a in turn.report.attempts} == {"the upstream is this proxy itself"}

    run(main())


# --- a silent upstream -----------------------------------------------------------------------


def test_silence_before_any_event_is_a_failed_attempt_that_is_retried() -> None:
    async def main() -> None:
        async with rig(idle_s=0.2, retry_budget=1) as r:
            r.upstream.script(Hostility(Behaviour.SILENT))
            turn, response = await r.post(headers=SESSION)
            assert response.status_code == 200  # the retry on the owner completed
            assert [a.outcome for a in turn.report.attempts] == [
                "upstream_silent",
                "response.completed",
            ]
            assert len({a.account for a in turn.report.attempts}) == 1

    run(main())


def test_silence_with_no_retry_left_is_a_502_and_no_strike() -> None:
    async def main() -> None:
        async with rig(idle_s=0.2, retry_budget=0) as r:
            r.upstream.script(Hostility(Behaviour.SILENT))
            _, response = await r.post(headers=SESSION)
            assert response.status_code == 502
            assert "no upstream event for 0.2 s" in response.json()["error"]["message"]
            assert r.healthy()

    run(main())


def test_silence_after_events_ends_the_stream_with_response_failed() -> None:
    async def main() -> None:
        async with rig(idle_s=0.5, keepalive_s=0.1) as r:
            r.upstream.script(Hostility(Behaviour.SILENT, after_events=2))
            turn, response = await r.post(headers=SESSION)
            got = events(response)
            assert [t for t, _ in got][:2] == ["response.created", "response.output_text.delta"]
            last_type, last = got[-1]
            assert last_type == "response.failed"
            assert last["response"]["error"]["code"] == "stream_incomplete"
            assert "bridge_stream_idle_timeout" in last["response"]["error"]["message"]
            assert b": keepalive" in response.content  # the comment timer is a separate one
            assert turn.report.outcome == "stream_incomplete"

    run(main())


# --- events that cannot be relayed -----------------------------------------------------------

UNENCODABLE = [
    Behaviour.NEWLINE_TYPE,
    Behaviour.INVALID_JSON,
    Behaviour.BINARY_FRAME,
    Behaviour.HUGE_NUMBER,
]


@pytest.mark.parametrize("behaviour", UNENCODABLE)
def test_an_unencodable_first_event_is_a_502(behaviour: Behaviour) -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script(Hostility(behaviour))
            turn, response = await r.post(headers=SESSION)
            assert response.status_code == 502
            assert error_code(response) == "invalid_upstream_event"
            assert len(turn.report.attempts) == 1
            assert r.healthy()

    run(main())


@pytest.mark.parametrize("behaviour", UNENCODABLE)
def test_an_unencodable_event_mid_stream_ends_it_with_response_failed(
    behaviour: Behaviour,
) -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script(Hostility(behaviour, after_events=2))
            _, response = await r.post(headers=SESSION)
            assert response.status_code == 200
            got = events(response)  # every event is JSON a client can read
            assert [t for t, _ in got] == [
                "response.created",
                "response.output_text.delta",
                "response.failed",
            ]
            assert got[-1][1]["response"]["error"]["code"] == "invalid_upstream_event"
            assert b"Infinity" not in response.content and b"forged" not in response.content

    run(main())


def test_a_client_that_did_not_stream_gets_a_502_for_a_binary_frame() -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script(Hostility(Behaviour.BINARY_FRAME, after_events=2))
            _, response = await r.post({"model": "m", "input": "hi"})
            assert response.status_code == 502
            assert error_code(response) == "invalid_upstream_event"

    run(main())


# --- upstream-chosen text never carries a secret ---------------------------------------------


def _no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (*TOKENS.values(), CLIENT_BEARER):
            assert secret not in text


@pytest.mark.parametrize(
    ("plan", "status"),
    [
        (Hostility(Behaviour.ECHO_TOKEN_IN_CLOSE), 502),
        (Hostility(Behaviour.ECHO_TOKEN_IN_CLOSE, after_events=2), 200),
        (Hostility(Behaviour.ECHO_TOKEN_IN_ERROR), 400),
        (Hostility(Behaviour.ECHO_TOKEN_IN_ERROR, after_events=2), 200),
        (Hostility(Behaviour.ECHO_TOKEN_IN_429), 429),
    ],
)
@pytest.mark.parametrize("pooled", [True, False])
def test_an_echoed_token_reaches_neither_client_nor_report_nor_log(
    plan: Hostility, status: int, pooled: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        async with rig(pooled=pooled, retry_budget=0) as r:
            r.upstream.script(plan)
            turn, response = await r.post(headers=SESSION)
            assert response.status_code == status
            sent = r.upstream.records[0].headers
            bearer = next(v for k, v in sent if k.lower() == "authorization")
            assert bearer.removeprefix("Bearer ") in (*TOKENS.values(), CLIENT_BEARER)
            report = json.dumps([a.as_dict() for a in turn.report.attempts])
            # The echo reached the client's body or the attempt list, cut out.
            assert "<redacted>" in response.content.decode() + report
            _no_secret(
                response.content.decode(),
                json.dumps(dict(response.headers)),
                report,
                turn.report.describe(),
            )

    run(main())
    # The bridge's own log lines (the fake upstream's are the test's business).
    _no_secret(*(r.getMessage() for r in caplog.records if r.name.startswith(BRIDGE_LOGGERS)))


# --- handshake headers by mode ---------------------------------------------------------------

CLIENT_CHOSEN = [
    ("OpenAI-Organization", "org-client"),
    ("OpenAI-Project", "proj-client"),
    ("x-api-key", "client-x-key"),
    ("api-key", "client-api-key"),
]


@pytest.mark.parametrize("pooled", [True, False])
def test_organization_project_and_api_keys_go_upstream_only_in_pass_through(
    pooled: bool,
) -> None:
    async def main() -> None:
        async with rig(pooled=pooled) as r:
            _, response = await r.post(headers=[*SESSION, *CLIENT_CHOSEN])
            assert response.status_code == 200
            sent = {k.lower(): v for k, v in r.upstream.records[0].headers}
            for name, value in CLIENT_CHOSEN:
                assert (sent.get(name.lower()) == value) is not pooled

    run(main())


# --- reset times and rate limits -------------------------------------------------------------


def test_an_absurd_retry_after_is_clamped_for_the_pool_and_the_client() -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script(Hostility(Behaviour.HUGE_RETRY_AFTER_429))
            _, response = await r.post(headers=SESSION)
            assert response.status_code == 429
            assert 1 <= int(response.headers["retry-after"]) <= MAX_RESET_S
            pool = r.state.pool
            assert pool is not None
            remaining = [row.cooldown_remaining_s for row in pool.snapshot()]
            cooling = [s for s in remaining if s is not None]
            assert len(cooling) == 1 and 0 < cooling[0] <= MAX_RESET_S

    run(main())


def test_a_rate_limit_event_without_status_is_a_429_with_retry_after() -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script(Hostility(Behaviour.RATE_LIMIT_EVENT_WITHOUT_STATUS))
            _, response = await r.post(headers=SESSION)
            assert response.status_code == 429
            assert 1 <= int(response.headers["retry-after"]) <= MAX_RESET_S

    run(main())


def test_a_hard_request_whose_owner_alone_is_cooling_says_so() -> None:
    async def main() -> None:
        async with rig() as r:
            r.upstream.script(Hostility(Behaviour.HUGE_RETRY_AFTER_429))
            assert (await r.post(headers=SESSION))[1].status_code == 429
            turn, response = await r.post(headers=SESSION)
            assert response.status_code == 429
            assert error_code(response) == "owner_cooling_down"
            assert 1 <= int(response.headers["retry-after"]) <= MAX_RESET_S
            assert turn.report.attempts == []
            assert len(r.upstream.records) == 1
            # Another session still gets the account that is not cooling.
            assert (await r.post(headers=[("session-id", "s-2")]))[1].status_code == 200

    run(main())
