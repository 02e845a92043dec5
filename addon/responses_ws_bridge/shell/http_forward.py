"""One HTTP/1.1 exchange with an upstream, for the requests the pool forwards: h11 over asyncio.

A thin I/O layer, like `upstream_client` for WebSockets: it connects (TLS as
the bridge's WebSocket client verifies it), sends the request with the
headers and body it is given, and hands back the answer's head and then its
body in pieces as they arrive, so an answer streams through to the client
unchanged. What goes into the headers, and what an answer means, is
`core.forward_policy`'s. One connection per exchange: it closes when the
exchange is done. Failures are the turn's vocabulary (`ConnectFailed`,
`ConnectionLost`) raised inside `AttemptFailed`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import h11

from responses_ws_bridge.core.failures import (
    AttemptFailed,
    ConnectFailed,
    ConnectionLost,
    Failure,
)
from responses_ws_bridge.shell.upstream_client import UpstreamSettings, client_tls_context

READ_SIZE = 64 * 1024


class ExchangeTap(Protocol):
    """Observes one forwarded exchange (implemented by the flow recorder)."""

    def answered(self, status: int, reason: str, headers: Sequence[tuple[str, str]]) -> None: ...

    def body(self, data: bytes) -> None: ...

    def ended(self, error: str | None) -> None: ...


@dataclass
class HttpExchange:
    """An upstream answer being read: its head, then its body piece by piece."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    _reader: asyncio.StreamReader = field(repr=False)
    _writer: asyncio.StreamWriter = field(repr=False)
    _conn: h11.Connection = field(repr=False)
    tap: ExchangeTap | None = None
    done: bool = False

    async def read(self, timeout: float | None) -> tuple[bytes, bool]:
        """The next body bytes and whether the body ended; TimeoutError after `timeout`."""
        if self.done:
            return b"", True
        try:
            async with asyncio.timeout(timeout):
                event = await _next_event(self._conn, self._reader)
        except AttemptFailed as exc:
            self.done = True
            if self.tap is not None:
                self.tap.ended(str(exc))
            raise
        if isinstance(event, h11.Data):
            data = bytes(event.data)
            if self.tap is not None:
                self.tap.body(data)
            return data, False
        self.done = True
        if self.tap is not None:
            self.tap.ended(None)
        return b"", True

    async def read_whole(self, limit: int, timeout: float | None) -> tuple[bytes, bool]:
        """The rest of the body, at most `limit` bytes; whether that was all of it."""
        parts: list[bytes] = []
        size = 0
        while size <= limit:
            data, end = await self.read(timeout)
            parts.append(data)
            size += len(data)
            if end:
                return b"".join(parts), True
        return b"".join(parts), False

    def close(self) -> None:
        if not self.done and self.tap is not None:
            self.tap.ended("the bridge stopped reading the answer")
        self.done = True
        self._writer.close()


async def exchange(
    url: str,
    method: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    settings: UpstreamSettings,
    *,
    head_timeout: float | None,
    tap: ExchangeTap | None = None,
) -> HttpExchange:
    """Sends one request; returns once the answer's head is in. Raises `AttemptFailed`."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    context = client_tls_context(secure, settings)
    try:
        async with asyncio.timeout(settings.connect_timeout):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=context,
                server_hostname=host if context is not None else None,
                limit=READ_SIZE,
            )
    except TimeoutError as exc:
        detail = f"timed out after {settings.connect_timeout:g} s connecting to {url}"
        raise _failed(tap, ConnectFailed(detail, timed_out=True)) from exc
    except (OSError, ssl.SSLError) as exc:
        raise _failed(tap, ConnectFailed(f"cannot connect to {url}: {exc}")) from exc
    conn = h11.Connection(h11.CLIENT)
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    fields = [("Host", parts.netloc), *headers]
    if body or method in ("POST", "PUT", "PATCH"):
        fields.append(("Content-Length", str(len(body))))
    try:
        writer.write(conn.send(h11.Request(method=method, target=target, headers=fields)))
        if body:
            writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        async with asyncio.timeout(head_timeout):
            event = await _next_event(conn, reader)
            while isinstance(event, h11.InformationalResponse):
                event = await _next_event(conn, reader)
    except BaseException as exc:
        writer.close()
        if isinstance(exc, TimeoutError):
            raise _failed(tap, ConnectFailed(f"no answer from {url}", timed_out=True)) from exc
        if isinstance(exc, AttemptFailed):
            raise _failed(tap, exc.failure) from exc
        if isinstance(exc, OSError | h11.LocalProtocolError):
            raise _failed(tap, ConnectionLost(f"sending to {url}: {exc}")) from exc
        if tap is not None:
            tap.ended("the exchange was cancelled")
        raise
    assert isinstance(event, h11.Response)
    answer_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
    reason = event.reason.decode("latin-1")
    if tap is not None:
        tap.answered(event.status_code, reason, answer_headers)
    return HttpExchange(event.status_code, reason, answer_headers, reader, writer, conn, tap=tap)


def _failed(tap: ExchangeTap | None, failure: Failure) -> AttemptFailed:
    """The exchange got no answer: the tap records why, the caller raises it."""
    error = AttemptFailed(failure)
    if tap is not None:
        tap.ended(str(error))
    return error


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
    """The next h11 event, reading as needed; raises AttemptFailed when the upstream breaks off."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            lost = ConnectionLost(f"the upstream's answer is not HTTP: {exc}")
            raise AttemptFailed(lost) from exc
        if event is h11.NEED_DATA:
            try:
                data = await reader.read(READ_SIZE)
            except OSError as exc:
                raise AttemptFailed(ConnectionLost(str(exc))) from exc
            conn.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            raise AttemptFailed(ConnectionLost("the upstream closed the connection mid-answer"))
        assert isinstance(event, h11.Event)
        return event
