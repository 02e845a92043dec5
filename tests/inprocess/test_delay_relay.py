"""The delay relay against a real echo server on 127.0.0.1: bytes, order, half-close, delay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from harness.delay_relay import DelayRelay

TIMEOUT = 15.0


def run_async(body: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(TIMEOUT):
            return await body()

    return asyncio.run(main())


class Echo:
    """Echoes every byte back; half-closes when the client did."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Echo:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def echo_through(relay: DelayRelay, payload: bytes, pieces: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    step = max(1, len(payload) // pieces)

    async def send() -> None:
        for start in range(0, len(payload), step):
            writer.write(payload[start : start + step])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    received = await reader.read(-1)  # until the relayed half-close
    await sender
    writer.close()
    return received


@pytest.mark.parametrize(("rtt", "max_buffer"), [(0.0, 4 * 1024 * 1024), (0.01, 1024)])
def test_every_byte_arrives_in_order_and_the_half_close_too(rtt: float, max_buffer: int) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every offset recognisable modulo 256

    async def body() -> None:
        async with Echo() as echo, DelayRelay(echo.port, rtt, max_buffer=max_buffer) as relay:
            results = await asyncio.gather(*(echo_through(relay, payload, 300) for _ in range(3)))
            assert relay.accepted == 3
        assert all(r == payload for r in results)

    run_async(body)


def test_a_new_connection_pays_the_handshake_and_a_round_trip() -> None:
    rtt = 0.05

    async def body() -> tuple[float, float]:
        async with Echo() as echo, DelayRelay(echo.port, rtt) as relay:
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            first = time.monotonic() - started
            # On the open connection a second exchange costs one round trip only.
            started = time.monotonic()
            writer.write(b"pong")
            assert await reader.readexactly(4) == b"pong"
            second = time.monotonic() - started
            writer.close()
            return first, second

    # Lower bounds only: one RTT for TCP and one for the exchange, then one per exchange.
    first, second = run_async(body)
    assert first >= 2 * rtt and second >= rtt


def test_a_refused_target_drops_the_client() -> None:
    async def body() -> bytes:
        async with Echo() as echo:
            port = echo.port
        async with DelayRelay(port, 0.0) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            try:
                return await reader.read(-1)
            except ConnectionError:
                return b""
            finally:
                writer.close()

    assert run_async(body) == b""


def test_stop_ends_open_connections() -> None:
    async def body() -> bytes:
        async with Echo() as echo:
            relay = DelayRelay(echo.port, 0.0)
            await relay.start()
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            await relay.stop()
            try:
                return await reader.read(-1)
            except ConnectionError:
                return b""
            finally:
                writer.close()

    assert run_async(body) == b""
