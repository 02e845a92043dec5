"""The upstream WebSocket connection without sockets: bytes in, messages and bytes out.

A `FakeTransport` stands for the socket and websockets' sans-I/O
`ServerProtocol` for the upstream: each test moves bytes between the two by
hand, as a script, and looks at what the connection wrote, queued or raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from responses_ws_bridge.shell.ws_connection import KEEPALIVE_TIMEOUT_REASON, WebSocketConnection
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.extensions.permessage_deflate import (
    ServerPerMessageDeflateFactory,
    enable_client_permessage_deflate,
)
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Event, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

URI = parse_uri("ws://upstream.test/v1/responses")


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(5):
            return await body()

    return asyncio.run(main())


class FakeTransport(asyncio.Transport):
    """Keeps what is written; closing calls connection_lost a loop turn later, as asyncio does."""

    def __init__(self, conn: WebSocketConnection) -> None:
        super().__init__()
        self.conn = conn
        self.written = bytearray()
        self.reading = True
        self.closing = False
        self.eof_written = False

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        self.written += data

    def take(self) -> bytes:
        data, self.written = bytes(self.written), bytearray()
        return data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)


class Wire:
    """One connection, its fake transport, and the upstream's protocol."""

    def __init__(self, conn: WebSocketConnection) -> None:
        self.conn = conn
        self.transport = FakeTransport(conn)
        self.server = ServerProtocol()
        conn.connection_made(self.transport)

    def upstream_receives(self) -> list[Event]:
        """What the connection wrote, as the upstream reads it."""
        self.server.receive_data(self.transport.take())
        return self.server.events_received()

    def upstream_sends(self, *frames: Frame) -> None:
        for frame in frames:
            self.server.send_frame(frame)
        self.deliver()

    def deliver(self) -> None:
        self.conn.data_received(b"".join(self.server.data_to_send()))


def text(data: str, fin: bool = True) -> Frame:
    return Frame(Opcode.TEXT, data.encode(), fin)


def connection(**kwargs: Any) -> WebSocketConnection:
    settings: dict[str, Any] = {"ping_interval": None, "ping_timeout": None, "close_timeout": 5.0}
    settings.update(kwargs)
    max_size = settings.pop("max_size", 1 << 20)
    return WebSocketConnection(ClientProtocol(URI, max_size=max_size), **settings)


def upgrade(wire: Wire, headers: list[tuple[str, str]] | None = None) -> Request:
    request = wire.conn.protocol.connect()
    request.headers.update(headers or [])
    wire.conn.send_request(request)
    (received,) = wire.upstream_receives()
    assert isinstance(received, Request)
    return received


async def opened(**kwargs: Any) -> Wire:
    wire = Wire(connection(**kwargs))
    request = upgrade(wire)
    wire.server.send_response(wire.server.accept(request))
    wire.deliver()
    assert wire.conn.opened.done() and wire.conn.protocol.state is State.OPEN
    return wire


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)


# -- the upgrade


def test_the_upgrade_goes_out_with_the_headers_given_and_no_user_agent_of_its_own() -> None:
    async def body() -> None:
        wire = Wire(connection())
        request = upgrade(wire, [("User-Agent", "codex_cli_rs/0.1"), ("Authorization", "x")])
        names = [name.lower() for name, _ in request.headers.raw_items()]
        assert names.count("user-agent") == 1
        assert request.headers["User-Agent"] == "codex_cli_rs/0.1"
        assert "sec-websocket-extensions" not in names
        assert not wire.conn.opened.done()

    run(body)


def test_a_101_opens_the_connection_and_frames_behind_it_are_queued() -> None:
    async def body() -> list[str | bytes]:
        wire = Wire(connection())
        request = upgrade(wire)
        wire.server.send_response(wire.server.accept(request))
        wire.server.send_frame(text('{"type":"response.created"}'))
        wire.deliver()
        assert wire.conn.response is not None and wire.conn.response.status_code == 101
        return await wire.conn.receive_batch()

    assert run(body) == ['{"type":"response.created"}']


def test_a_rejection_settles_the_upgrade_with_the_response() -> None:
    async def body() -> None:
        wire = Wire(connection())
        upgrade(wire)
        wire.server.send_response(wire.server.reject(429, "slow down\n"))
        wire.deliver()
        assert wire.conn.opened.done()
        exc = wire.conn.protocol.handshake_exc
        assert isinstance(exc, InvalidStatus) and exc.response.status_code == 429
        assert wire.conn.response is exc.response

    run(body)


def test_a_connection_lost_before_any_answer_settles_the_upgrade() -> None:
    async def body() -> None:
        wire = Wire(connection())
        upgrade(wire)
        wire.conn.connection_lost(ConnectionResetError())
        assert wire.conn.opened.done() and wire.conn.lost.done()
        assert isinstance(wire.conn.protocol.handshake_exc, InvalidMessage)

    run(body)


# -- receiving


def test_every_queued_message_comes_in_one_batch_text_as_str_binary_as_bytes() -> None:
    async def body() -> list[str | bytes]:
        wire = await opened()
        wire.upstream_sends(text("a"), Frame(Opcode.BINARY, b"\x00b"))
        wire.upstream_sends(text("c"))
        return await wire.conn.receive_batch()

    assert run(body) == ["a", b"\x00b", "c"]


def test_a_reader_with_a_timeout_gets_nothing_when_nothing_came() -> None:
    async def body() -> tuple[list[str | bytes], list[str | bytes], list[str | bytes]]:
        wire = await opened()
        empty = await wire.conn.receive_batch(0.01)
        wire.upstream_sends(text("a"))
        # Queued messages come at once, whatever the timeout.
        queued = await wire.conn.receive_batch(0)
        reader = asyncio.ensure_future(wire.conn.receive_batch(30))
        await asyncio.sleep(0)
        wire.upstream_sends(text("b"))
        return empty, queued, await reader

    assert run(body) == ([], ["a"], ["b"])


def test_a_waiting_reader_is_woken_by_the_next_message() -> None:
    async def body() -> list[str | bytes]:
        wire = await opened()
        reader = asyncio.ensure_future(wire.conn.receive_batch())
        await asyncio.sleep(0)
        assert not reader.done()
        wire.upstream_sends(text("a"), text("b"))
        return await reader

    assert run(body) == ["a", "b"]


def test_fragments_make_one_message() -> None:
    async def body() -> list[str | bytes]:
        wire = await opened()
        wire.upstream_sends(text("he", fin=False), Frame(Opcode.CONT, b"ll", fin=False))
        assert wire.conn.buffered == 0
        wire.upstream_sends(Frame(Opcode.CONT, b"o"))
        return await wire.conn.receive_batch()

    assert run(body) == ["hello"]


def test_a_cancelled_reader_loses_nothing() -> None:
    async def body() -> list[str | bytes]:
        wire = await opened()
        reader = asyncio.ensure_future(wire.conn.receive_batch())
        await asyncio.sleep(0)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        wire.upstream_sends(text("a"))
        return await wire.conn.receive_batch()

    assert run(body) == ["a"]


def test_reading_pauses_above_the_high_water_mark_and_resumes_when_the_reader_takes() -> None:
    async def body() -> None:
        wire = await opened(high_water=1000)
        wire.upstream_sends(*[text("x" * 300)] * 3)
        assert wire.transport.reading and wire.conn.buffered == 900
        wire.upstream_sends(text("x" * 300))
        assert not wire.transport.reading and wire.conn.buffered == 1200
        assert len(await wire.conn.receive_batch()) == 4
        assert wire.transport.reading and wire.conn.buffered == 0

    run(body)


def test_an_unfinished_fragmented_message_does_not_pause_reading() -> None:
    async def body() -> None:
        wire = await opened(high_water=1000)
        wire.upstream_sends(text("x" * 600, fin=False), Frame(Opcode.CONT, b"x" * 600, fin=False))
        assert wire.transport.reading

    run(body)


def test_invalid_utf8_fails_the_connection_with_1007_and_keeps_earlier_messages() -> None:
    async def body() -> None:
        wire = await opened()
        wire.upstream_sends(text("a"), Frame(Opcode.TEXT, b"\xff"), text("b"))
        (close,) = wire.upstream_receives()
        assert isinstance(close, Frame) and Close.parse(close.data).code == 1007
        assert await wire.conn.receive_batch() == ["a"]

    run(body)


def test_a_message_over_max_size_fails_the_connection_with_1009() -> None:
    async def body() -> None:
        wire = await opened(max_size=10)
        wire.upstream_sends(text("x" * 11))
        (close,) = wire.upstream_receives()
        assert isinstance(close, Frame) and Close.parse(close.data).code == 1009

    run(body)


def script_frames() -> tuple[list[Frame], list[str | bytes]]:
    """Frames of every length encoding, a fragmented message with a ping inside, and
    what the reader should get from them."""
    frames = [
        text("short"),
        text("m" * 300),  # 16-bit length
        Frame(Opcode.BINARY, b"\x01" * 70000),  # 64-bit length
        text("frag", fin=False),
        Frame(Opcode.PING, b"p"),
        Frame(Opcode.CONT, b"mented"),
        Frame(Opcode.BINARY, b""),
        text("é" * 3),
    ]
    return frames, ["short", "m" * 300, b"\x01" * 70000, "fragmented", b"", "é" * 3]


@pytest.mark.parametrize("chunk", [1, 3, 7, 125, 4096, 1 << 20])
def test_frames_cut_anywhere_read_as_websockets_reads_them(chunk: int) -> None:
    async def body() -> tuple[list[str | bytes], list[Event]]:
        wire = Wire(connection())
        request = upgrade(wire)
        frames, _ = script_frames()
        # The 101 and the frames behind it, on one stream cut into `chunk`-byte pieces.
        wire.server.send_response(wire.server.accept(request))
        for frame in frames:
            wire.server.send_frame(frame)
        data = b"".join(wire.server.data_to_send())
        for at in range(0, len(data), chunk):
            wire.conn.data_received(data[at : at + chunk])
        return await wire.conn.receive_batch(0), wire.upstream_receives()

    messages, answered = run(body)
    assert messages == script_frames()[1]
    assert [(f.opcode, f.data) for f in answered if isinstance(f, Frame)] == [(Opcode.PONG, b"p")]


def test_a_large_frame_in_many_pieces_is_joined_once_when_whole() -> None:
    async def body() -> tuple[list[int], list[str | bytes]]:
        wire = await opened(max_size=1 << 22)
        wire.server.send_frame(text("x" * (1 << 21)))
        data = b"".join(wire.server.data_to_send())
        held: list[int] = []
        for at in range(0, len(data), 16384):
            wire.conn.data_received(data[at : at + 16384])
            held.append(len(wire.conn._partial))
        return held, await wire.conn.receive_batch(0)

    held, messages = run(body)
    # The pieces wait as they came (no copy of all so far at each one); the last makes it whole.
    assert held[:-1] == list(range(1, len(held)))
    assert held[-1] == 0
    assert messages == ["x" * (1 << 21)]


def test_a_masked_frame_from_the_upstream_fails_the_connection_with_1002() -> None:
    async def body() -> None:
        wire = await opened()
        wire.upstream_sends(text("a"))
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(b"b"))
        wire.conn.data_received(b"\x81\x81" + mask + masked)
        (close,) = wire.upstream_receives()
        assert isinstance(close, Frame) and Close.parse(close.data).code == 1002
        assert await wire.conn.receive_batch() == ["a"]

    run(body)


def test_a_frame_over_max_size_fails_before_its_payload_arrives() -> None:
    async def body() -> None:
        wire = await opened(max_size=1000)
        wire.conn.data_received(b"\x81\x7f" + (1 << 40).to_bytes(8))  # the header alone
        (close,) = wire.upstream_receives()
        assert isinstance(close, Frame) and Close.parse(close.data).code == 1009

    run(body)


def test_an_end_of_stream_inside_a_frame_is_an_abnormal_closure() -> None:
    async def body() -> None:
        wire = await opened()
        wire.server.send_frame(text("cut short"))
        data = b"".join(wire.server.data_to_send())
        wire.conn.data_received(data[:-3])
        wire.conn.eof_received()
        wire.conn.connection_lost(None)
        with pytest.raises(ConnectionClosed) as caught:
            await wire.conn.receive_batch()
        assert caught.value.rcvd is None and caught.value.sent is None
        # websockets judged the unfinished frame itself: it knows how much was missing.
        parser_exc = wire.conn.protocol.parser_exc
        assert isinstance(parser_exc, EOFError) and "expected" in str(parser_exc)

    run(body)


def test_compressed_messages_are_read_by_websockets_itself() -> None:
    async def body() -> list[str | bytes]:
        conn = WebSocketConnection(
            ClientProtocol(URI, extensions=enable_client_permessage_deflate(None)),
            ping_interval=None,
            ping_timeout=None,
            close_timeout=5.0,
        )
        wire = Wire(conn)
        wire.server = ServerProtocol(extensions=[ServerPerMessageDeflateFactory()])
        request = upgrade(wire)
        wire.server.send_response(wire.server.accept(request))
        wire.server.send_text(b"squeeze " * 100)
        wire.server.send_text(b"again")
        wire.deliver()
        assert conn.protocol.extensions
        return await conn.receive_batch(0)

    assert run(body) == ["squeeze " * 100, "again"]


def test_the_upstreams_pings_are_answered() -> None:
    async def body() -> list[Event]:
        wire = await opened()
        wire.upstream_sends(Frame(Opcode.PING, b"hi"))
        return wire.upstream_receives()

    (pong,) = run(body)
    assert isinstance(pong, Frame) and pong.opcode is Opcode.PONG and pong.data == b"hi"


# -- closing


def test_the_upstreams_close_is_echoed_and_raised_once_tcp_is_closed() -> None:
    async def body() -> ConnectionClosed:
        wire = await opened()
        wire.upstream_sends(text("last"), Frame(Opcode.CLOSE, Close(1011, "boom").serialize()))
        (echo,) = wire.upstream_receives()
        assert isinstance(echo, Frame) and echo.opcode is Opcode.CLOSE
        assert await wire.conn.receive_batch() == ["last"]
        reader = asyncio.ensure_future(wire.conn.receive_batch())
        await asyncio.sleep(0)
        assert not reader.done()  # closed only once TCP is
        wire.conn.connection_lost(None)
        with pytest.raises(ConnectionClosed) as closed:
            await reader
        return closed.value

    closed = run(body)
    assert closed.rcvd == Close(1011, "boom") and closed.rcvd_then_sent is True


def test_a_connection_lost_without_a_close_frame_raises_with_neither_frame() -> None:
    async def body() -> ConnectionClosed:
        wire = await opened()
        wire.conn.connection_lost(ConnectionResetError())
        with pytest.raises(ConnectionClosed) as closed:
            await wire.conn.receive_batch()
        return closed.value

    closed = run(body)
    assert closed.rcvd is None and closed.sent is None


def test_close_waits_for_the_tcp_close_and_aborts_after_close_timeout() -> None:
    async def body() -> None:
        wire = await opened(close_timeout=0.01)
        await wire.conn.close(1000, "done")
        (close,) = wire.upstream_receives()
        assert isinstance(close, Frame) and Close.parse(close.data) == Close(1000, "done")
        assert wire.transport.closing and wire.conn.protocol.state is State.CLOSED

    run(body)


def test_sending_on_a_closed_connection_raises() -> None:
    async def body() -> None:
        wire = await opened()
        wire.conn.connection_lost(None)
        with pytest.raises(ConnectionClosed):
            await wire.conn.send_text("late")

    run(body)


# -- sending


def test_a_send_waits_while_the_transport_has_paused_writing() -> None:
    async def body() -> list[Event]:
        wire = await opened()
        wire.conn.pause_writing()
        sender = asyncio.ensure_future(wire.conn.send_text('{"type":"response.create"}'))
        await asyncio.sleep(0)
        assert not sender.done()
        wire.conn.resume_writing()
        await sender
        return wire.upstream_receives()

    (frame,) = run(body)
    assert isinstance(frame, Frame) and frame.opcode is Opcode.TEXT


# -- keepalive


def test_keepalive_pings_and_a_pong_keeps_the_connection_open() -> None:
    async def body() -> None:
        wire = await opened(ping_interval=0.01, ping_timeout=0.05)
        await until(lambda: bool(wire.transport.written))
        (ping,) = wire.upstream_receives()
        assert isinstance(ping, Frame) and ping.opcode is Opcode.PING
        wire.deliver()  # the upstream's protocol answered with a pong
        await until(lambda: bool(wire.transport.written))  # the next ping, not a close
        (ping,) = wire.upstream_receives()
        assert isinstance(ping, Frame) and ping.opcode is Opcode.PING
        assert wire.conn.protocol.state is State.OPEN

    run(body)


def test_an_unanswered_ping_closes_with_1011_keepalive_ping_timeout() -> None:
    async def body() -> ConnectionClosed:
        wire = await opened(ping_interval=0.01, ping_timeout=0.01, close_timeout=0.01)
        reader = asyncio.ensure_future(wire.conn.receive_batch())
        with pytest.raises(ConnectionClosed) as closed:
            await reader  # the upstream never answers, then never closes: aborted
        ping, close = wire.upstream_receives()
        assert isinstance(ping, Frame) and ping.opcode is Opcode.PING
        assert isinstance(close, Frame) and close.opcode is Opcode.CLOSE
        return closed.value

    closed = run(body)
    assert closed.sent == Close(CloseCode.INTERNAL_ERROR, KEEPALIVE_TIMEOUT_REASON)
    assert closed.rcvd is None


def test_closing_a_connection_never_made_returns_at_once() -> None:
    async def body() -> None:
        await connection().close()

    run(body)
