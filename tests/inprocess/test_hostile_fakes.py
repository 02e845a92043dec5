"""The hostile upstream and hostile client test fakes do what they say."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import h11
import pytest
from responses_ws_bridge.core.body_decoding import DecodedTooLarge, decode_body
from responses_ws_bridge.core.sse import UnencodableEvent, encode_upstream_event
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.hostile_client import (
    BAD_HEADERS,
    chunked_flood,
    endless,
    gzip_bomb,
    raw_request,
    request_head,
)
from tests.support.hostile_upstream import (
    HUGE_RETRY_AFTER,
    Behaviour,
    HostileUpstream,
    Hostility,
)

TOKEN = "account-token-abcdef123456"
CREATE = json.dumps({"type": "response.create", "model": "m", "input": "hi"})


def run(check: Callable[[HostileUpstream], Awaitable[None]], plan: Hostility) -> None:
    async def main() -> None:
        async with HostileUpstream(plan) as upstream:
            async with asyncio.timeout(20):
                await check(upstream)

    asyncio.run(main())


async def turn(upstream: HostileUpstream, *, wait_s: float = 5.0) -> list[str | bytes]:
    """Frames received for one response.create until the upstream closes (or `wait_s`)."""
    got: list[str | bytes] = []
    async with connect(
        f"{upstream.url}/v1/responses",
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        ping_interval=0.05,
        ping_timeout=1,
    ) as ws:
        await ws.send(CREATE)
        try:
            async with asyncio.timeout(wait_s):
                async for frame in ws:
                    got.append(frame)
        except TimeoutError:
            got.append("<timeout>")
        except ConnectionClosed:
            pass
        if ws.close_reason is not None and ws.close_code is not None:
            got.append(f"<close {ws.close_code} {ws.close_reason}>")
    return got


def test_echoes_the_token_in_its_close_reason() -> None:
    async def check(upstream: HostileUpstream) -> None:
        frames = await turn(upstream)
        assert frames == [f"<close 1011 bad token {TOKEN}>"]
        assert upstream.records[0].messages == [CREATE]

    run(check, Hostility(Behaviour.ECHO_TOKEN_IN_CLOSE))


def test_echoes_the_token_in_an_error_event() -> None:
    async def check(upstream: HostileUpstream) -> None:
        frames = await turn(upstream, wait_s=0.5)
        event = json.loads(frames[0])
        assert event["type"] == "error" and TOKEN in event["error"]["message"]

    run(check, Hostility(Behaviour.ECHO_TOKEN_IN_ERROR))


@pytest.mark.parametrize("behaviour", [Behaviour.ECHO_TOKEN_IN_429, Behaviour.HUGE_RETRY_AFTER_429])
def test_rejects_with_a_429_and_an_absurd_retry_after(behaviour: Behaviour) -> None:
    async def check(upstream: HostileUpstream) -> None:
        with pytest.raises(InvalidStatus) as info:
            await turn(upstream)
        response = info.value.response
        assert response.status_code == 429
        assert response.headers["Retry-After"] == HUGE_RETRY_AFTER
        echoed = TOKEN.encode() in response.body
        assert echoed is (behaviour is Behaviour.ECHO_TOKEN_IN_429)

    run(check, Hostility(behaviour))


def test_silent_upstream_answers_pings_but_sends_no_event() -> None:
    async def check(upstream: HostileUpstream) -> None:
        # ping_interval 0.05 s, ping_timeout 1 s: a dead peer would close within the wait.
        frames = await turn(upstream, wait_s=1.5)
        assert frames == ["<timeout>"]

    run(check, Hostility(Behaviour.SILENT))


def test_silent_after_events() -> None:
    async def check(upstream: HostileUpstream) -> None:
        frames = await turn(upstream, wait_s=0.5)
        assert [json.loads(f)["type"] for f in frames[:-1]] == [
            "response.created",
            "response.output_text.delta",
        ]
        assert frames[-1] == "<timeout>"

    run(check, Hostility(Behaviour.SILENT, after_events=2))


@pytest.mark.parametrize(
    "behaviour",
    [Behaviour.NEWLINE_TYPE, Behaviour.INVALID_JSON, Behaviour.BINARY_FRAME, Behaviour.HUGE_NUMBER],
)
def test_sends_events_no_client_could_read(behaviour: Behaviour) -> None:
    async def check(upstream: HostileUpstream) -> None:
        frames = await turn(upstream, wait_s=0.5)
        bad = frames[1]
        assert isinstance(json.loads(frames[0]), dict)  # a normal event first
        with pytest.raises(UnencodableEvent):
            encode_upstream_event(bad, None)

    run(check, Hostility(behaviour, after_events=1))


def test_rate_limit_event_without_status() -> None:
    async def check(upstream: HostileUpstream) -> None:
        frames = await turn(upstream, wait_s=0.5)
        event = json.loads(frames[0])
        assert event["type"] == "error" and "status" not in event
        assert event["error"]["code"] == "rate_limit_exceeded"

    run(check, Hostility(Behaviour.RATE_LIMIT_EVENT_WITHOUT_STATUS))


def test_queued_plans_then_the_default() -> None:
    async def check(upstream: HostileUpstream) -> None:
        upstream.script(Hostility(Behaviour.ECHO_TOKEN_IN_CLOSE, close_code=1008))
        first = await turn(upstream)
        second = await turn(upstream, wait_s=0.5)
        assert str(first[-1]).startswith("<close 1008")
        assert json.loads(second[-2])["type"] == "response.completed"
        assert len(upstream.records) == 2

    run(check, Hostility(Behaviour.COMPLETE))


# --- the hostile client -----------------------------------------------------------------------


def test_gzip_bomb_is_small_and_decodes_to_its_size() -> None:
    bomb = gzip_bomb(32 * 1024 * 1024)
    assert len(bomb) < 64 * 1024
    with pytest.raises(DecodedTooLarge):
        decode_body(bomb, "gzip", limit=1024 * 1024)
    assert decode_body(gzip_bomb(1000), "gzip", limit=1000) == bytes(1000)


def test_chunked_flood_is_valid_chunked_framing() -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request_head("POST", "/", [("host", "x"), ("transfer-encoding", "chunked")]))
    for piece in chunked_flood(200_000, size=65536):
        conn.receive_data(piece)
    size = 0
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            size += len(event.data)
        if isinstance(event, h11.EndOfMessage) or event is h11.NEED_DATA:
            break
    assert isinstance(event, h11.EndOfMessage) and size == 200_000


def test_bad_headers_are_bytes_a_str_client_could_not_send() -> None:
    head = request_head("POST", "/v1/responses", BAD_HEADERS["non_ascii_request_id"])
    assert b"x-request-id: req-\xc3\xa9" in head
    assert len(request_head("POST", "/", BAD_HEADERS["headers_over_16_kib"])) > 16 * 1024


def test_raw_request_sees_an_early_answer_and_the_close() -> None:
    answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"

    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        head = request_head("POST", "/v1/responses", [("content-length", str(10**12))])
        try:
            result = await asyncio.to_thread(
                raw_request, port, head, endless(), timeout=10, max_body=256 * 1024 * 1024
            )
        finally:
            server.close()
            await server.wait_closed()
        assert result.status == 413 and result.body == b"{}"
        assert result.closed
        assert result.body_bytes_sent < 256 * 1024 * 1024

    asyncio.run(main())
