"""The loopback endpoint: one-time tokens, streaming, hang-up detection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
from responses_ws_bridge.shell.loopback import TOKEN_HEADER, LoopbackServer, ResponseSink


def run(coro_fn: Callable[[LoopbackServer], Awaitable[None]]) -> None:
    async def main() -> None:
        server = LoopbackServer()
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
