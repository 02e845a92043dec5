"""The loopback endpoint: one-time tokens, streaming, hang-up detection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import httpx
import pytest
from responses_ws_bridge.shell.loopback import TOKEN_HEADER, LoopbackServer, ResponseSink


def run(
    coro_fn: Callable[[LoopbackServer], Awaitable[None]],
    *,
    header_timeout_s: float = 10.0,
    idle_timeout_s: float = 60.0,
) -> None:
    async def main() -> None:
        server = LoopbackServer(header_timeout_s=header_timeout_s, idle_timeout_s=idle_timeout_s)
        await server.start()
        try:
            async with asyncio.timeout(20):
                await coro_fn(server)
        finally:
            await server.stop()

    asyncio.run(main())


def test_binds_to_loopback_only() -> None:
    async def check(server: LoopbackServer) -> None:
        assert server._server is not None
        hosts = {sock.getsockname()[0] for sock in server._server.sockets}
        assert hosts == {"127.0.0.1"}

    run(check)


def test_request_without_token_is_refused() -> None:
    async def check(server: LoopbackServer) -> None:
        async with httpx.AsyncClient() as client:
            response = await client.post(f"http://127.0.0.1:{server.port}/v1/responses")
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"

    run(check)


def test_token_serves_once_and_streams_chunks() -> None:
    async def job(sink: ResponseSink) -> None:
        await sink.start(200, [("content-type", "text/event-stream")])
        await sink.write(b"event: a\ndata: 1\n\n")
        await sink.write(b"event: b\ndata: 2\n\n")
        await sink.finish()

    async def check(server: LoopbackServer) -> None:
        token = server.register(job)
        url = f"http://127.0.0.1:{server.port}/v1/responses"
        async with httpx.AsyncClient() as client:
            first = await client.post(url, headers={TOKEN_HEADER: token}, content=b"{}")
            # Same keep-alive connection, same token: refused.
            second = await client.post(url, headers={TOKEN_HEADER: token}, content=b"{}")
        assert first.status_code == 200
        assert first.content == b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\n"
        assert first.headers["transfer-encoding"] == "chunked"
        assert "server" not in first.headers and "date" not in first.headers
        assert second.status_code == 403
        assert server.pending == 0

    run(check)


def test_wrong_token_does_not_consume_the_right_one() -> None:
    async def job(sink: ResponseSink) -> None:
        await sink.respond(200, [("content-type", "application/json")], b"{}")

    async def check(server: LoopbackServer) -> None:
        token = server.register(job)
        url = f"http://127.0.0.1:{server.port}/v1/responses"
        async with httpx.AsyncClient() as client:
            wrong = await client.post(url, headers={TOKEN_HEADER: token[:-1] + "x"})
            right = await client.post(url, headers={TOKEN_HEADER: token})
        assert (wrong.status_code, right.status_code) == (403, 200)

    run(check)


def test_hangup_cancels_the_job() -> None:
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def job(sink: ResponseSink) -> None:
        await sink.start(200, [("content-type", "text/event-stream")])
        await sink.write(b"data: first\n\n")
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def check(server: LoopbackServer) -> None:
        token = server.register(job)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /v1/responses HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n"
            + TOKEN_HEADER.encode()
            + b": "
            + token.encode()
            + b"\r\n\r\n"
        )
        await writer.drain()
        await started.wait()
        head = await reader.readuntil(b"first\n\n")
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 5)

    run(check)


def test_failing_job_gets_a_502_and_the_server_keeps_serving() -> None:
    async def broken(sink: ResponseSink) -> None:
        raise RuntimeError("bug")

    async def fine(sink: ResponseSink) -> None:
        await sink.respond(200, [("content-type", "application/json")], b"{}")

    async def check(server: LoopbackServer) -> None:
        url = f"http://127.0.0.1:{server.port}/v1/responses"
        async with httpx.AsyncClient() as client:
            bad = await client.post(url, headers={TOKEN_HEADER: server.register(broken)})
            good = await client.post(url, headers={TOKEN_HEADER: server.register(fine)})
        assert bad.status_code == 502
        assert bad.json()["error"]["code"] == "bridge_internal_error"
        assert good.status_code == 200

    run(check)


def test_job_starts_before_its_request_arrives_and_writes_after() -> None:
    began = asyncio.Event()

    async def job(sink: ResponseSink) -> None:
        began.set()  # e.g. the upstream is being opened meanwhile
        await sink.respond(200, [("content-type", "application/json")], b"{}")

    async def check(server: LoopbackServer) -> None:
        token = server.register(job)
        await asyncio.wait_for(began.wait(), 5)
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"http://127.0.0.1:{server.port}/v1/responses", headers={TOKEN_HEADER: token}
            )
        assert response.status_code == 200

    run(check)


def test_discarded_job_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def job(sink: ResponseSink) -> None:
        try:
            await sink.write(b"never sent")
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def check(server: LoopbackServer) -> None:
        token = server.register(job)
        await asyncio.sleep(0)
        server.discard(token)
        await asyncio.wait_for(cancelled.wait(), 5)
        assert server.pending == 0

    run(check)


# --- timeouts and early answers ---------------------------------------------------------------


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent until it closed; fails if it stays open longer."""
    return await asyncio.wait_for(reader.read(), seconds)


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connects and says nothing
        b"POST /v1/responses HTTP/1.1\r\nhost: x\r\n",  # half a request head
        b"POST /v1/resp",
    ],
)
def test_silent_or_half_sent_connections_are_closed(sent: bytes) -> None:
    async def check(server: LoopbackServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(sent)
        await writer.drain()
        assert await closed_within(reader, 5) == b""
        writer.close()
        assert server.connections == 0 or await _no_connections(server)

    run(check, header_timeout_s=0.2, idle_timeout_s=0.2)


def test_a_trickled_request_head_cannot_outlast_the_header_timeout() -> None:
    async def check(server: LoopbackServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        closed = asyncio.ensure_future(closed_within(reader, 5))
        # One byte at a time, each well within the idle timeout.
        for byte in b"POST /v1/responses HTTP/1.1\r\nhost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx":
            if closed.done():
                break
            writer.write(bytes([byte]))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.sleep(0.02)
        assert await closed == b""
        writer.close()

    run(check, header_timeout_s=0.3, idle_timeout_s=5.0)


def test_a_stalled_body_is_closed_by_the_idle_timeout() -> None:
    async def job(sink: ResponseSink) -> None:
        await sink.respond(200, [], b"{}")

    async def check(server: LoopbackServer) -> None:
        token = server.register(job)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /v1/responses HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n"
            + TOKEN_HEADER.encode()
            + b": "
            + token.encode()
            + b"\r\n\r\nonly part"
        )
        await writer.drain()
        assert await closed_within(reader, 5) == b""
        writer.close()

    run(check, header_timeout_s=5.0, idle_timeout_s=0.2)


def test_keep_alive_between_requests_lasts_the_idle_timeout() -> None:
    async def check(server: LoopbackServer) -> None:
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{server.port}/v1/responses"
            first = await client.post(url)
            second = await client.post(url)  # same connection, well within the idle timeout
        assert (first.status_code, second.status_code) == (403, 403)

    run(check, header_timeout_s=5.0, idle_timeout_s=5.0)


async def _no_connections(server: LoopbackServer) -> bool:
    for _ in range(100):
        if server.connections == 0:
            return True
        await asyncio.sleep(0.01)
    return False
