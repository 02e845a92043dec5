"""The upstream client on sockets on 127.0.0.1: the upgrade as sent, its timeout, backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from responses_ws_bridge.core.failures import AttemptFailed, ConnectFailed
from responses_ws_bridge.shell.upstream_client import UpstreamSettings, open_session
from responses_ws_bridge.shell.ws_connection import HIGH_WATER
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

TIMEOUT = 15.0
# The most asyncio's socket transport hands over in one data_received.
READ_CHUNK = 256 * 1024


def run_async(body: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(TIMEOUT):
            return await body()

    return asyncio.run(main())


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


class Tap:
    """Keeps what `handshake_done` was told."""

    def __init__(self) -> None:
        self.handshakes: list[tuple[Request | None, Response | None, str | None]] = []

    def attach(self, turn: Any, attempt: Any) -> None:
        pass

    def idle(self) -> None:
        pass

    def handshake_done(
        self, request: Request | None, response: Response | None, error: str | None
    ) -> None:
        self.handshakes.append((request, response, error))

    def message(self, from_client: bool, data: str | bytes, timestamp: float) -> None:
        pass

    def closed(
        self, code: int | None, reason: str, closed_by_client: bool, timestamp: float
    ) -> None:
        pass


async def upgrade_headers(settings: UpstreamSettings) -> list[tuple[str, str]]:
    """The upgrade request's headers as a server receives them."""
    seen: list[Request] = []

    def keep(connection: ServerConnection, request: Request) -> None:
        seen.append(request)

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, process_request=keep) as server:
        port = server.sockets[0].getsockname()[1]
        headers = [("User-Agent", "codex_cli_rs/0.1"), ("Authorization", "Bearer t")]
        session = await open_session(f"ws://127.0.0.1:{port}/v1/responses", headers, settings)
        await session.close()
    return list(seen[0].headers.raw_items())


def test_the_upgrade_carries_the_headers_given_and_none_of_the_librarys_own() -> None:
    headers = run_async(lambda: upgrade_headers(UpstreamSettings()))
    names = [name.lower() for name, _ in headers]
    assert names == [
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "user-agent",
        "authorization",
    ]
    assert ("User-Agent", "codex_cli_rs/0.1") in headers


def test_compression_is_offered_only_when_asked_for() -> None:
    headers = run_async(lambda: upgrade_headers(UpstreamSettings(compression=True)))
    assert [v for k, v in headers if k == "Sec-WebSocket-Extensions"] == [
        "permessage-deflate; client_max_window_bits"
    ]


def test_the_connect_timeout_covers_an_upgrade_that_is_never_answered() -> None:
    async def body() -> tuple[AttemptFailed, Tap]:
        async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        server = await asyncio.start_server(say_nothing, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            tap = Tap()
            with pytest.raises(AttemptFailed) as failed:
                await open_session(
                    f"ws://127.0.0.1:{port}/v1/responses",
                    [],
                    UpstreamSettings(connect_timeout=0.2),
                    tap=tap,
                )
            return failed.value, tap

    failed, tap = run_async(body)
    assert isinstance(failed.failure, ConnectFailed) and failed.failure.timed_out
    ((request, response, error),) = tap.handshakes
    assert request is not None and request.path == "/v1/responses"
    assert response is None and error is not None and "timed out" in error


def test_a_flood_nobody_reads_pauses_reading_and_stays_bounded_then_arrives_whole() -> None:
    frames, size = 2048, 16 * 1024  # 32 MiB: more than the kernel's socket buffers hold
    sent: list[int] = []
    connections: list[ServerConnection] = []

    async def flood(ws: ServerConnection) -> None:
        connections.append(ws)
        for index in range(frames):
            await ws.send(f"{index:08d}".encode().ljust(size, b"."), text=True)
            sent.append(index)
        await ws.wait_closed()

    async def body() -> None:
        async with serve(flood, "127.0.0.1", 0, max_size=None) as server:
            port = server.sockets[0].getsockname()[1]
            session = await open_session(
                f"ws://127.0.0.1:{port}/v1/responses", [], UpstreamSettings()
            )
            ws = session._ws
            transport = ws.transport
            # Nobody reads: reading pauses, the upstream's writes back up and stop.
            await until(lambda: not transport.is_reading())
            await until(lambda: connections[0].transport.get_write_buffer_size() > 0)
            assert ws.buffered <= HIGH_WATER + READ_CHUNK
            assert len(sent) < frames
            received: list[str | bytes] = []
            while len(received) < frames:
                received.extend(await session.next_batch())
            assert [m[:8] for m in received] == [f"{i:08d}" for i in range(frames)]
            assert transport.is_reading()
            await session.close()

    run_async(body)
