"""A client's WebSocket that the pool answers itself, held inside mitmproxy's HTTP layer.

mitmproxy relays a client's WebSocket to the server its upgrade went to. A
client served by the account pool has no such server: its messages go
upstream on the bridge's own sockets, one turn at a time
(`shell.ws_client_run`). So for these flows only (`flow_streaming.serve_websocket`),
once the addon's 101 went out, the client's socket is held by
`PoolWebsocketLayer`, a mitmproxy layer like `WebsocketLayer` with one side:
messages from the client go to the service (`ClientSocket.recv`), and what the
service sends comes back as `WsOut` events through the connection handler's
`server_event`, each written at the client's pace (`drain_writers`). The
flow shows in mitmweb as any WebSocket flow, every message both ways and the
close; `websocket_start` and `websocket_end` run, `websocket_message` does
not (a relayed stream would run it per event).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import wsproto
import wsproto.events
from mitmproxy import ctx, http, websocket
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.websocket import (
    WebsocketConnection,
    WebsocketEndHook,
    WebsocketStartHook,
)
from wsproto.connection import ConnectionState
from wsproto.frame_protocol import Opcode

from responses_ws_bridge.addons.flow_streaming import FlowEvent
from responses_ws_bridge.core.ws_client_commands import ClientClosed, ClientText
from responses_ws_bridge.shell.sink import ClientGone

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(client_key: str) -> str:
    """The Sec-WebSocket-Accept that answers a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1((client_key.strip() + _GUID).encode()).digest()
    return base64.b64encode(digest).decode()


@dataclass
class WsOut(FlowEvent):
    """A message for the client (`data`), or the end of its socket (`close`)."""

    data: str | bytes | None = None
    close: bool = False
    code: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class WsHead:
    """How the upgrade is answered: 101 with `headers`, or an error with a body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = field(default=b"", repr=False)


class ClientSocket:
    """The service's view of one client WebSocket (`shell.ws_client_run.ClientSide`)."""

    def __init__(self, flow: http.HTTPFlow) -> None:
        loop = asyncio.get_running_loop()
        self.flow = flow
        self.head: asyncio.Future[WsHead] = loop.create_future()
        # Resolved once the client's side ended (it closed, dropped, or was closed).
        self.gone: asyncio.Future[ClientClosed] = loop.create_future()
        self._incoming: asyncio.Queue[ClientText | ClientClosed] = asyncio.Queue()

    # -- the service's side

    def accept(self, headers: Sequence[tuple[str, str]]) -> None:
        if not self.head.done():
            self.head.set_result(WsHead(101, tuple(headers)))

    def refuse(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        if not self.head.done():
            self.head.set_result(WsHead(status, tuple(headers), body))

    async def recv(self) -> ClientText | ClientClosed:
        return await self._incoming.get()

    async def send(self, data: str | bytes) -> None:
        if self.gone.done():
            raise ClientGone
        await self._feed(WsOut(self.flow, data=data))

    async def close(self, code: int | None, reason: str) -> None:
        if not self.gone.done():
            await self._feed(WsOut(self.flow, close=True, code=code, reason=reason))

    async def _feed(self, event: WsOut) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections.get(self.flow.client_conn.id)
        if handler is None:
            self.ended(None, "")
            raise ClientGone
        await handler.server_event(event)
        await handler.drain_writers()

    # -- the layer's side

    def received(self, text: str) -> None:
        self._incoming.put_nowait(ClientText(text))

    def ended(self, code: int | None, reason: str) -> None:
        if not self.gone.done():
            closed = ClientClosed(code, reason)
            self.gone.set_result(closed)
            self._incoming.put_nowait(closed)


class PoolWebsocketLayer(layer.Layer):
    """Holds the client's side of a WebSocket the pool serves (there is no server side)."""

    def __init__(self, context: Context, flow: http.HTTPFlow, socket: ClientSocket) -> None:
        super().__init__(context)
        self.flow = flow
        self.socket = socket
        self.ws = WebsocketConnection(wsproto.ConnectionType.SERVER, [], conn=context.client)
        self._parts: list[str | bytes] = []
        self._done = False

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield WebsocketStartHook(self.flow)
        elif isinstance(event, events.DataReceived) and event.connection == self.context.client:
            self.ws.receive_data(event.data)
            yield from self._from_client()
        elif isinstance(event, events.ConnectionClosed) and event.connection == self.context.client:
            self.ws.receive_data(None)
            yield from self._from_client()
            yield from self._end(None, "", by_client=True)
        elif isinstance(event, WsOut) and event.flow is self.flow:
            yield from self._to_client(event)

    def _from_client(self) -> layer.CommandGenerator[None]:
        for ws_event in self.ws.events():
            if isinstance(ws_event, wsproto.events.Message):
                self._parts.append(ws_event.data)
                if ws_event.message_finished:
                    yield from self._message()
            elif isinstance(ws_event, wsproto.events.Ping):
                yield self.ws.send2(ws_event.response())
            elif isinstance(ws_event, wsproto.events.CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    yield self.ws.send2(ws_event.response())
                code = ws_event.code if ws_event.code != 1006 else None
                yield from self._end(code, ws_event.reason or "", by_client=True)

    def _message(self) -> layer.CommandGenerator[None]:
        parts, self._parts = self._parts, []
        if all(isinstance(p, str) for p in parts):
            text = "".join(p for p in parts if isinstance(p, str))
            self._record(Opcode.TEXT, True, text.encode("utf-8", "surrogatepass"))
            self.socket.received(text)
        else:
            data = b"".join(p if isinstance(p, bytes) else p.encode() for p in parts)
            self._record(Opcode.BINARY, True, data)
            # The Responses protocol is text; a binary message goes on as UTF-8 text.
            self.socket.received(data.decode("utf-8", "replace"))
        yield from ()

    def _to_client(self, event: WsOut) -> layer.CommandGenerator[None]:
        if self._done:
            return
        if event.close:
            if event.code is not None and self.ws.state is ConnectionState.OPEN:
                close = wsproto.events.CloseConnection(event.code, event.reason)
                yield self.ws.send2(close)
            yield from self._end(event.code, event.reason, by_client=False)
            return
        data = event.data
        if isinstance(data, str):
            yield self.ws.send2(wsproto.events.TextMessage(data))
            self._record(Opcode.TEXT, False, data.encode("utf-8", "surrogatepass"))
        elif data is not None:
            yield self.ws.send2(wsproto.events.BytesMessage(data))
            self._record(Opcode.BINARY, False, data)

    def _record(self, opcode: Opcode, from_client: bool, content: bytes) -> None:
        if self.flow.websocket is not None:
            message = websocket.WebSocketMessage(opcode, from_client, content, time.time())
            self.flow.websocket.messages.append(message)

    def _end(
        self, code: int | None, reason: str, *, by_client: bool
    ) -> layer.CommandGenerator[None]:
        if self._done:
            return
        self._done = True
        data = self.flow.websocket
        if data is not None:
            data.timestamp_end = time.time()
            data.closed_by_client = by_client
            data.close_code = code if code is not None else 1006
            data.close_reason = reason
        self.socket.ended(code, reason)
        yield commands.CloseConnection(self.context.client)
        yield WebsocketEndHook(self.flow)
        self.flow.live = False
