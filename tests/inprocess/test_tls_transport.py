"""The upstream sockets' own TLS transport against real TLS peers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
from responses_ws_bridge.local.tls import TestPki, make_test_pki
from responses_ws_bridge.shell.tls_transport import TlsTransport, open_connection

from tests.support.aio import run_bounded

TIMEOUT = 10.0


def run_async(body: Callable[[], Awaitable[Any]]) -> Any:
    return run_bounded(body, TIMEOUT)


class Collector(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.events: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.arrived.set()

    def eof_received(self) -> bool:
        self.events.append("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)


@contextmanager
def thread_server(pki: TestPki, serve: Callable[[ssl.SSLSocket], None]) -> Iterator[int]:
    """A blocking TLS server for one connection; `serve` gets it after the handshake."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    context = pki.server_context()

    def main() -> None:
        raw, _ = listener.accept()
        raw.settimeout(TIMEOUT)
        with context.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False) as conn:
            serve(conn)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(TIMEOUT)
        listener.close()


def served(
    pki: TestPki, serve: Callable[[ssl.SSLSocket], None]
) -> tuple[Collector, Exception | None]:
    """What a connection to `serve` received, and what it was lost with."""

    async def body() -> tuple[Collector, Exception | None]:
        with thread_server(pki, serve) as port:
            collector = Collector()
            await open_connection(collector, "127.0.0.1", port, pki.client_context())
            return collector, await collector.lost

    result: tuple[Collector, Exception | None] = run_async(body)
    return result


def test_a_megabyte_each_way_arrives_whole_and_the_close_is_tls_s_own(pki: TestPki) -> None:
    payload = os.urandom(1024 * 1024)
    seen: dict[str, Any] = {}

    def echo(conn: ssl.SSLSocket) -> None:
        received = bytearray()
        while len(received) < len(payload):
            received += conn.recv(65536)
        conn.sendall(bytes(received))
        try:
            seen["after"] = conn.recv(1)  # b"": the client's close_notify, not a bare TCP close
        except ssl.SSLError as exc:
            seen["after"] = exc

    async def body() -> Collector:
        with thread_server(pki, echo) as port:
            collector = Collector()
            transport = await open_connection(collector, "127.0.0.1", port, pki.client_context())
            assert isinstance(transport, TlsTransport) and collector.transport is transport
            assert transport.get_extra_info("ssl_object").version() is not None
            transport.write(payload[:1000])
            transport.writelines([payload[1000:5000], payload[5000:]])
            while len(collector.data) < len(payload):
                collector.arrived.clear()
                await collector.arrived.wait()
            transport.close()
            await collector.lost
            return collector

    collector = run_async(body)
    assert bytes(collector.data) == payload
    assert seen["after"] == b""
    assert collector.events == ["made", "lost"]


def test_the_peer_s_close_notify_is_the_end_of_the_stream(pki: TestPki) -> None:
    def say_and_close(conn: ssl.SSLSocket) -> None:
        conn.sendall(b"bye")
        conn.unwrap()

    collector, exc = served(pki, say_and_close)
    assert bytes(collector.data) == b"bye"
    assert collector.events == ["made", "eof", "lost"]
    assert exc is None


def test_pausing_the_reading_strands_nothing_that_arrived(pki: TestPki) -> None:
    payload = os.urandom(256 * 1024)

    def send(conn: ssl.SSLSocket) -> None:
        conn.sendall(payload)
        conn.recv(1)

    async def body() -> bytes:
        with thread_server(pki, send) as port:
            collector = Collector()
            transport = await open_connection(collector, "127.0.0.1", port, pki.client_context())
            await collector.arrived.wait()
            transport.pause_reading()
            assert not transport.is_reading()
            await asyncio.sleep(0.2)  # the rest reaches the socket meanwhile
            transport.resume_reading()
            while len(collector.data) < len(payload):
                collector.arrived.clear()
                await collector.arrived.wait()
            transport.close()
            await collector.lost
            return bytes(collector.data)

    assert run_async(body) == payload


def test_a_certificate_the_context_does_not_trust_fails_the_opening(
    pki: TestPki, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = make_test_pki(tmp_path_factory.mktemp("other"))

    async def body() -> Collector:
        server = await asyncio.start_server(
            lambda r, w: None, "127.0.0.1", 0, ssl=pki.server_context()
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            collector = Collector()
            with pytest.raises(ssl.SSLCertVerificationError):
                await open_connection(collector, "127.0.0.1", port, other.client_context())
            return collector

    assert run_async(body).events == []


def test_a_server_that_hangs_up_during_the_handshake_fails_the_opening() -> None:
    async def body() -> Collector:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            collector = Collector()
            with pytest.raises(ConnectionError):
                await open_connection(collector, "127.0.0.1", port, ssl.create_default_context())
            return collector

    assert run_async(body).events == []


def test_a_corrupt_record_loses_the_connection_with_the_tls_error(pki: TestPki) -> None:
    def corrupt(conn: ssl.SSLSocket) -> None:
        conn.sendall(b"fine")
        raw = socket.socket(fileno=os.dup(conn.fileno()))
        raw.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data no key opens
        raw.close()
        conn.settimeout(2.0)
        with suppress(OSError, ssl.SSLError):
            conn.recv(1)

    collector, exc = served(pki, corrupt)
    assert bytes(collector.data) == b"fine"
    assert isinstance(exc, ssl.SSLError)
    assert collector.events == ["made", "lost"]


def test_plain_tcp_needs_no_tls_layer() -> None:
    async def body() -> bool:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hi")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(greet, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            collector = Collector()
            transport = await open_connection(collector, "127.0.0.1", port, None)
            await collector.lost
            return not isinstance(transport, TlsTransport) and bytes(collector.data) == b"hi"

    assert run_async(body)
