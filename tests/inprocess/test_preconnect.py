"""Connections made ahead against the real local upstream: TCP and TLS only, never a handshake."""

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
from responses_ws_bridge.local.upstream import ConnectionRecord, LocalUpstream
from responses_ws_bridge.shell.preconnect import Preconnector
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


def handshakes(upstream: LocalUpstream) -> list[ConnectionRecord]:
    return [r for r in upstream.records() if r.status is not None]


def test_a_new_session_sends_its_own_upgrade_on_a_connection_made_ahead() -> None:
    async def body(upstream: LocalUpstream) -> None:
        connector = Preconnector(per_host=1)
        url = f"{upstream.url}/v1/responses"
        first, preconnected = await connector.open(url, headers("s1"), SETTINGS)
        assert not preconnected  # nothing made yet: the request opens its own
        await connector.wait_idle()
        # One connection ready, and no handshake on it: the upstream saw one upgrade.
        assert connector.ready_count == 1 and len(handshakes(upstream)) == 1
        second, preconnected = await connector.open(url, headers("s2"), SETTINGS)
        assert preconnected and connector.taken == 1
        assert await completes_a_turn(second)
        record = handshakes(upstream)[1]
        # The handshake is the second request's own, made when it came.
        assert record.header("session-id") == "s2"
        assert record.header("x-request-id") == "req-s2"
        assert record.header("authorization") == "Bearer tok-a"
        await connector.wait_idle()
        assert connector.ready_count == 1
        for session in (first, second):
            await session.close()
        await connector.close_all()

    run_async(body)


def test_every_session_from_one_client_carries_its_own_session_id() -> None:
    async def body(upstream: LocalUpstream) -> None:
        connector = Preconnector(per_host=1)
        url = f"{upstream.url}/v1/responses"
        sessions = []
        for n in range(6):
            session, _ = await connector.open(url, headers(f"s{n}"), SETTINGS)
            assert await completes_a_turn(session)
            sessions.append(session)
            await connector.wait_idle()
        records = handshakes(upstream)
        assert [r.header("session-id") for r in records] == [f"s{n}" for n in range(6)]
        # Each create went out on the socket its own handshake opened.
        assert all(len(r.messages) == 1 for r in records)
        assert connector.taken == 5
        for session in sessions:
            await session.close()
        await connector.close_all()

    run_async(body)


def test_a_client_that_varies_its_headers_opens_nothing_more() -> None:
    async def body(upstream: LocalUpstream) -> None:
        connector = Preconnector(per_host=1)
        url = f"{upstream.url}/v1/responses"
        for n in range(10):
            extra = ("x-varies", f"v{n}")
            session, _ = await connector.open(url, headers(f"s{n}", extra), SETTINGS)
            await session.close()
            await connector.wait_idle()
        # Keyed by host: one connection ready at most, one made per request taken.
        assert connector.ready_count == 1
        assert connector.made == 10 and connector.taken == 9
        await connector.close_all()

    run_async(body)


def test_nothing_is_made_ahead_when_switched_off() -> None:
    async def body(upstream: LocalUpstream) -> None:
        connector = Preconnector(per_host=0)
        url = f"{upstream.url}/v1/responses"
        for n in range(3):
            session, preconnected = await connector.open(url, headers(f"s{n}"), SETTINGS)
            assert not preconnected
            await session.close()
        await connector.wait_idle()
        assert connector.made == 0 and connector.ready_count == 0

    run_async(body)


def test_a_connection_the_upstream_closed_is_not_used() -> None:
    async def body(upstream: LocalUpstream) -> None:
        connector = Preconnector(per_host=1)
        url = f"{upstream.url}/v1/responses"
        first, _ = await connector.open(url, headers("s1"), SETTINGS)
        await connector.wait_idle()
        (ready,) = [m for host in connector._hosts.values() for m in host.ready]
        # The server drops the silent connection: the bridge notices, and opens anew.
        ready.take().abort()
        await asyncio.sleep(0)
        second, preconnected = await connector.open(url, headers("s2"), SETTINGS)
        assert not preconnected
        assert await completes_a_turn(second)
        for session in (first, second):
            await session.close()
        await connector.close_all()

    run_async(body)


def test_connections_age_out_and_a_quiet_host_keeps_none() -> None:
    async def body(upstream: LocalUpstream) -> None:
        clock = Clock()
        connector = Preconnector(per_host=1, max_age_s=60, idle_ttl_s=120, clock=clock)
        url = f"{upstream.url}/v1/responses"
        first, _ = await connector.open(url, headers("s1"), SETTINGS)
        await connector.wait_idle()
        clock.now += 61
        connector.reap()  # too old: dropped, and another made (the host is still wanted)
        await connector.wait_idle()
        assert connector.ready_count == 1 and connector.made == 2
        clock.now += 120
        connector.reap()  # nobody wanted the host for the idle TTL: nothing kept
        assert connector.ready_count == 0 and not connector._hosts
        await first.close()
        await connector.close_all()

    run_async(body)


def test_a_host_that_refuses_gets_no_connections_for_a_while() -> None:
    async def body(upstream: LocalUpstream) -> None:
        attempts = 0

        async def refuse(url: str, settings: UpstreamSettings) -> Any:
            nonlocal attempts
            attempts += 1
            raise ConnectionRefusedError("refused")

        clock = Clock()
        connector = Preconnector(per_host=1, retry_after_s=30, connector=refuse, clock=clock)
        url = f"{upstream.url}/v1/responses"
        for n in range(3):
            session, _ = await connector.open(url, headers(f"s{n}"), SETTINGS)
            await session.close()
            await connector.wait_idle()
        assert attempts == 1
        clock.now += 31
        session, _ = await connector.open(url, headers("s9"), SETTINGS)
        await session.close()
        await connector.wait_idle()
        assert attempts == 2
        await connector.close_all()

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


def test_a_request_on_a_connection_made_ahead_is_recorded_from_its_handshake_on() -> None:
    async def body(upstream: LocalUpstream) -> None:
        connector = Preconnector(per_host=1)
        url = f"{upstream.url}/v1/responses"
        first, _ = await connector.open(url, headers("s1"), SETTINGS)
        await connector.wait_idle()
        tap = Tap()
        second, preconnected = await connector.open(url, headers("s2"), SETTINGS, tap=tap)
        assert preconnected and second.tap is tap
        ((request, response),) = tap.handshakes
        assert request is not None and response is not None and response.status_code == 101
        assert request.headers.get("session-id") == "s2"
        assert await completes_a_turn(second)
        assert tap.messages > 1
        for session in (first, second):
            await session.close()
        await connector.close_all()

    run_async(body)
