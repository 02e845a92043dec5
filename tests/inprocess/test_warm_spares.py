"""Warm spares against the real local upstream: taken, replaced, aged out, closed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from responses_ws_bridge.core.handshake_headers import (
    UpstreamCredential,
    upstream_handshake_headers,
)
from responses_ws_bridge.core.turns import Attempt, Turn
from responses_ws_bridge.local.upstream import ConnectionRecord, LocalUpstream, Plan
from responses_ws_bridge.shell.session_pool import WarmSpares
from responses_ws_bridge.shell.upstream_client import UpstreamSession, UpstreamSettings
from websockets.http11 import Request, Response

TIMEOUT = 15.0
SETTINGS = UpstreamSettings()
TEAM_A = UpstreamCredential("tok-a")


def run_async(body: Callable[[LocalUpstream], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(TIMEOUT), LocalUpstream() as upstream:
            return await body(upstream)

    return asyncio.run(main())


def headers(session: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    client = [("session-id", session), ("user-agent", "codex_exec/0.169.0"), *extra]
    return upstream_handshake_headers(client, TEAM_A, request_id=f"req-{session}")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def completes_a_turn(session: UpstreamSession) -> bool:
    await session.send(json.dumps({"type": "response.create", "model": "m", "input": "hi"}))
    while True:
        for message in await session.next_batch():
            if json.loads(message)["type"] == "response.completed":
                return True


def open_records(upstream: LocalUpstream) -> list[ConnectionRecord]:
    return [r for r in upstream.records() if r.status == 101 and not r.ended]


def test_a_request_without_an_idle_session_takes_the_spare_and_it_is_replaced() -> None:
    async def body(upstream: LocalUpstream) -> None:
        spares = WarmSpares(per_key=1)
        url = f"{upstream.url}/v1/responses"
        first, warm = await spares.open(url, headers("s1"), SETTINGS, account="a")
        assert not warm  # nothing to take yet: opened for the request, then a spare
        await spares.wait_idle()
        assert spares.ready_count == 1 and len(upstream.records()) == 2
        spare_record = upstream.records()[1]
        # The spare's handshake carries the account's headers, not the first request's ids.
        assert spare_record.header("authorization") == "Bearer tok-a"
        assert spare_record.header("user-agent") == "codex_exec/0.169.0"
        assert spare_record.header("session-id") is None
        assert spare_record.header("x-request-id") is None

        second, warm = await spares.open(url, headers("s2"), SETTINGS, account="a")
        assert warm and spares.taken == 1
        assert await completes_a_turn(second)
        await spares.wait_idle()
        # Replaced at once: one ready again, on a third connection.
        assert spares.ready_count == 1 and len(upstream.records()) == 3
        await first.close()
        await second.close()
        await spares.close_all()
        records = await upstream.wait_until(lambda rs: all(r.ended for r in rs), 5)
        assert records[2].close_code == 1001

    run_async(body)


def test_a_spare_serves_only_a_matching_handshake() -> None:
    async def body(upstream: LocalUpstream) -> None:
        spares = WarmSpares(per_key=1)
        url = f"{upstream.url}/v1/responses"
        sessions = [(await spares.open(url, headers("s1"), SETTINGS, account="a"))[0]]
        await spares.wait_idle()
        for client_headers, account in [
            (headers("s2", ("user-agent", "other/1.0")), "a"),  # another client identity
            (headers("s3"), "b"),  # another account
            (headers("s4", ("x-codex-turn-state", "ts")), "a"),  # its own handshake
        ]:
            session, warm = await spares.open(url, client_headers, SETTINGS, account=account)
            sessions.append(session)
            assert not warm
        assert spares.taken == 0
        for session in sessions:
            await session.close()
        await spares.close_all()

    run_async(body)


def test_no_spares_when_switched_off() -> None:
    async def body(upstream: LocalUpstream) -> None:
        spares = WarmSpares(per_key=0)
        url = f"{upstream.url}/v1/responses"
        for key in ("s1", "s2"):
            session, warm = await spares.open(url, headers(key), SETTINGS, account="a")
            assert not warm
            await session.close()
        await spares.wait_idle()
        assert spares.ready_count == 0 and len(upstream.records()) == 2
        await spares.close_all()

    run_async(body)


def test_spares_age_out_and_a_quiet_key_loses_them() -> None:
    clock = Clock()

    async def body(upstream: LocalUpstream) -> None:
        spares = WarmSpares(per_key=1, idle_ttl_s=60, max_age_s=300, clock=clock)
        url = f"{upstream.url}/v1/responses"
        first, _ = await spares.open(url, headers("s1"), SETTINGS, account="a")
        await spares.wait_idle()
        # Older than its max age: not handed out, closed, and a fresh one is opened instead.
        clock.now += 301
        second, warm = await spares.open(url, headers("s2"), SETTINGS, account="a")
        assert not warm
        await spares.wait_idle()
        assert spares.ready_count == 1
        # Nobody wants the key for the idle TTL: the reaper closes its spare for good.
        clock.now += 61
        spares.reap()
        assert spares.ready_count == 0
        await spares.wait_idle()
        assert spares.ready_count == 0
        records = await upstream.wait_until(
            lambda rs: len(rs) == 4 and rs[1].ended and rs[3].ended, 5
        )
        assert [(r.close_code, r.close_reason) for r in (records[1], records[3])] == [
            (1000, "spare expired"),
            (1000, "idle"),
        ]
        await first.close()
        await second.close()
        await spares.close_all()

    run_async(body)


def test_removing_the_account_closes_its_spares() -> None:
    async def body(upstream: LocalUpstream) -> None:
        spares = WarmSpares(per_key=2)
        url = f"{upstream.url}/v1/responses"
        session, _ = await spares.open(url, headers("s1"), SETTINGS, account="a")
        await spares.wait_idle()
        assert spares.ready_count == 2
        spares.drop_account("a")
        assert spares.ready_count == 0
        records = await upstream.wait_until(lambda rs: sum(r.ended for r in rs) == 2, 5)
        assert {r.close_reason for r in records if r.ended} == {"account removed"}
        await session.close()
        await spares.close_all()

    run_async(body)


def test_a_spare_that_cannot_be_opened_is_not_retried_at_once() -> None:
    clock = Clock()

    async def body(upstream: LocalUpstream) -> None:
        spares = WarmSpares(per_key=1, retry_after_s=30, clock=clock)
        url = f"{upstream.url}/v1/responses"
        # The request's own socket is accepted; the spare's handshake is refused.
        upstream.script(Plan(), Plan(reject_status=429))
        first, _ = await spares.open(url, headers("s1"), SETTINGS, account="a")
        await spares.wait_idle()
        assert spares.ready_count == 0
        second, _ = await spares.open(url, headers("s2"), SETTINGS, account="a")
        await spares.wait_idle()
        assert spares.ready_count == 0 and len(upstream.records()) == 3
        clock.now += 31
        third, _ = await spares.open(url, headers("s3"), SETTINGS, account="a")
        await spares.wait_idle()
        assert spares.ready_count == 1
        for session in (first, second, third):
            await session.close()
        await spares.close_all()

    run_async(body)


class Tap:
    def __init__(self) -> None:
        self.handshakes: list[tuple[Request | None, Response | None]] = []
        self.messages = 0

    def attach(self, turn: Turn, attempt: Attempt) -> None:
        pass

    def idle(self) -> None:
        pass

    def handshake_done(
        self, request: Request | None, response: Response | None, error: str | None
    ) -> None:
        self.handshakes.append((request, response))

    def message(self, from_client: bool, data: str | bytes, timestamp: float) -> None:
        self.messages += 1

    def closed(
        self, code: int | None, reason: str, closed_by_client: bool, timestamp: float
    ) -> None:
        pass


def test_the_request_that_takes_a_spare_records_it_from_its_handshake_on() -> None:
    async def body(upstream: LocalUpstream) -> None:
        spares = WarmSpares(per_key=1)
        url = f"{upstream.url}/v1/responses"
        first, _ = await spares.open(url, headers("s1"), SETTINGS, account="a")
        await spares.wait_idle()
        tap = Tap()
        second, warm = await spares.open(url, headers("s2"), SETTINGS, account="a", tap=tap)
        assert warm and second.tap is tap
        ((request, response),) = tap.handshakes
        assert request is not None and response is not None and response.status_code == 101
        assert request.headers.get("authorization") == "Bearer tok-a"
        assert await completes_a_turn(second)
        assert tap.messages > 1
        for session in (first, second):
            await session.close()
        await spares.close_all()

    run_async(body)
