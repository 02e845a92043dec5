"""Plain HTTP on a `websockets` server's own port, as a real Responses host serves both.

`websockets` answers a WebSocket upgrade and nothing else: it refuses a
request with a body, so `POST /v1/responses/compact` could never reach a
test upstream that also serves `wss://…/responses`. `sniffing(handler)` is a
`create_connection` for `websockets.asyncio.server.serve`: each connection
reads its first request head; an upgrade goes on to `websockets` as if
nothing happened, anything else is read with h11 and answered by `handler`
(one request per connection, `Connection: close`), and the connection's
WebSocket handshake ends quietly with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
from websockets.asyncio.server import ServerConnection

logger = logging.getLogger(__name__)

_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str  # with its query
    headers: list[tuple[str, str]]
    body: bytes = field(repr=False)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""


HttpHandler = Callable[[HttpRequest], Awaitable[HttpAnswer]]


def _is_upgrade(head: bytes) -> bool:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


def sniffing(handler: HttpHandler) -> type[ServerConnection]:
    """A `ServerConnection` class that answers plain HTTP requests with `handler`."""
    return type("SniffingConnection", (_Sniffing,), {"http_handler": staticmethod(handler)})


class _Sniffing(ServerConnection):
    """Reads the first request head, then is a WebSocket connection or answers plain HTTP."""

    http_handler: HttpHandler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mode: str | None = None
        self._head = bytearray()
        self._http = h11.Connection(h11.SERVER)
        self._more = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def data_received(self, data: bytes) -> None:
        if self._mode == "ws":
            super().data_received(data)
            return
        if self._mode == "http":
            self._http.receive_data(data)
            self._more.set()
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0 and len(self._head) < _MAX_HEAD:
            return
        buffered, self._head = bytes(self._head), bytearray()
        if end < 0 or _is_upgrade(buffered[:end]):
            self._mode = "ws"
            super().data_received(buffered)
            return
        self._mode = "http"
        self._http.receive_data(buffered)
        self._task = asyncio.get_running_loop().create_task(self._serve_http())

    # True keeps the transport open for the answer (asyncio), which websockets never needs.
    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self._mode == "http":
            self._http.receive_data(b"")
            self._more.set()
            return True
        return super().eof_received()

    async def _serve_http(self) -> None:
        try:
            request = await self._read_request()
            if request is not None:
                self._send(await self.http_handler(request))
        except Exception:
            logger.exception("local HTTP side failed")
            with contextlib.suppress(Exception):
                self._send(HttpAnswer(500, [("Content-Type", "text/plain")], b"error\n"))
        finally:
            self.transport.close()

    async def _read_request(self) -> HttpRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = self._http.next_event()
            if event is h11.NEED_DATA:
                self._more.clear()
                await self._more.wait()
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]
                method, target = head.method.decode("ascii"), head.target.decode("ascii")
                return HttpRequest(method, target, headers, bytes(body))
            else:
                return None

    def _send(self, answer: HttpAnswer) -> None:
        headers = [
            *answer.headers,
            ("Content-Length", str(len(answer.body))),
            ("Connection", "close"),
        ]
        out = self._http.send(h11.Response(status_code=answer.status, headers=headers)) or b""
        if answer.body:
            out += self._http.send(h11.Data(data=answer.body)) or b""
        out += self._http.send(h11.EndOfMessage()) or b""
        self.transport.write(out)
