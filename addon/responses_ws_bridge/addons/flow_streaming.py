"""A response body the addon produces itself, streamed from inside mitmproxy's HTTP layer.

mitmproxy sends a response that an addon sets in the `request` hook all at
once. For a bridged flow the body is the upstream's events, produced while the
client waits, so this module teaches mitmproxy's HTTP layer (12.x) two things,
for flows registered here only:

- a response set by the addon starts a *streamed* response (headers now, body
  later), exactly as a streamed upstream response does;
- a `_Feed` event, sent with the connection handler's `server_event`, carries
  a body chunk (or the end, or an error) to that flow's stream, which then runs
  through mitmproxy's own code: `flow.response.stream`, h1/h2 framing, TLS,
  the `response` hook at the end, `error` when the client leaves;
- a client that reads slowly slows the producer down (`FlowSink.write`): over
  HTTP/1.1 through the socket's write buffer, over HTTP/2 also through the
  stream's flow-control window, beyond which mitmproxy's h2 layer would queue
  without limit;
- a request body the addon takes itself (`consume_body`) is handed chunk by
  chunk to `flow.request.stream` and never buffered, with no server
  connection: mitmproxy would otherwise read a body whole before the
  `request` hook, however large, or stream it to a server. A response set in
  `requestheaders` then goes out at once, before the body (no
  `100 Continue`), and the connection closes after it (`close_left_open`
  makes sure the socket does close).

Everything else is mitmproxy's unchanged code path. These are mitmproxy
internals: `missing_internals()` lists the ones this module touches that the
installed mitmproxy lacks, and `install()` refuses to patch anything then
(`OptionsError`, naming the version and the supported range). There is no
other way to answer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from mitmproxy import connection, ctx, exceptions, http, version
from mitmproxy import flow as mitmflow
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import (
    DropStream,
    ErrorCode,
    HttpErrorHook,
    HttpLayer,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpStream,
    RequestData,
    RequestEndOfMessage,
    RequestProtocolError,
    RequestTrailers,
    ResponseData,
    ResponseEndOfMessage,
    ResponseProtocolError,
    SendHttp,
)
from mitmproxy.proxy.layers.http._http2 import Http2Connection
from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection
from mitmproxy.proxy.server import ConnectionHandler, ConnectionIO

from responses_ws_bridge.core.openai_errors import HttpError
from responses_ws_bridge.mitmproxy_support import SUPPORTED
from responses_ws_bridge.recording.session_flows import METADATA_KEY, make_response
from responses_ws_bridge.shell.request_body import BodyCollector
from responses_ws_bridge.shell.sink import ClientGone

logger = logging.getLogger(__name__)

# Ids of the flows whose response body an addon produces.
_live: set[str] = set()
# Flows whose request body an addon takes itself: flow id -> its collector (None: dropped).
_consumed: dict[str, BodyCollector | None] = {}
# WebSocket upgrades an addon answers itself: flow id -> the layer that serves the socket.
LayerFactory = Callable[[Context, http.HTTPFlow], layer.Layer]
_websockets: dict[str, LayerFactory] = {}
_installed = False


@dataclass
class FlowEvent(events.Event):
    """An event for the layer that serves `flow` (sent with the handler's `server_event`)."""

    flow: http.HTTPFlow


@dataclass
class _Feed(FlowEvent):
    """A body chunk for `flow` (`data` None: the end; `error`: abort the response)."""

    data: bytes | None = None
    error: str | None = None
    # Asked for once per response (`count_unsent`), set where the flow's stream was
    # found: how many bytes of its response wait in mitmproxy's HTTP layer for the client.
    count_unsent: bool = False
    unsent: Callable[[], int] | None = None


class _AddonStream(HttpStream):
    def start_request_stream(self) -> layer.CommandGenerator[None]:
        if self.flow.id not in _consumed:
            yield from super().start_request_stream()
            return
        if self.flow.response is not None:
            # Answered from the headers alone: the body is read and dropped, never kept.
            self.client_state = self.state_drop_request_body
            yield from self._answer_now()
            return
        self.client_state = self.state_collect_request_body

    def state_collect_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        collector = _consumed.get(self.flow.id)
        if isinstance(event, RequestData):
            if collector is not None:
                collector(event.data)
                refused = collector.refused
                if refused is not None:
                    # Over the limit (or a bomb, or corrupt): answer now, take no more.
                    self.flow.response = _response(refused)
                    self.client_state = self.state_drop_request_body
                    yield from self._answer_now()
        elif isinstance(event, RequestTrailers):
            self.flow.request.trailers = event.trailers
        elif isinstance(event, RequestEndOfMessage):
            if collector is not None:
                collector(b"")
            self.flow.request.timestamp_end = time.time()
            self.client_state = self.state_done
            yield HttpRequestHook(self.flow)
            if (yield from self.check_killed(True)):
                return
            if self.flow.response is not None:
                self.flow.response.timestamp_start = time.time()
                yield HttpResponseHeadersHook(self.flow)
                if (yield from self.check_killed(True)):
                    return
                yield from self.send_response()

    def state_drop_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from ()

    def _answer_now(self) -> layer.CommandGenerator[None]:
        """Sends the response set before the body was read, then ends the connection."""
        assert self.flow.response is not None
        _consumed.pop(self.flow.id, None)
        if self.flow.request.http_version.startswith("HTTP/1"):
            self.flow.response.headers["connection"] = "close"
        self.flow.response.timestamp_start = time.time()
        yield HttpResponseHeadersHook(self.flow)
        yield from self.send_response()
        self.flow.live = False
        if self.flow.request.http_version.startswith("HTTP/1"):
            # The client may go on sending; only closing stops it. (HTTP/2: the
            # stream is done, what else arrives for it is dropped.)
            yield commands.CloseConnection(self.context.client)

    def send_response(self, already_streamed: bool = False) -> layer.CommandGenerator[None]:
        if (
            not already_streamed
            and self.flow.id in _live
            and self.server_state == self.state_wait_for_response_headers
        ):
            # Headers now; the body comes as `_Feed` events.
            yield from self.start_response_stream()
            return
        yield from super().send_response(already_streamed)

    def handle_protocol_error(
        self, event: RequestProtocolError | ResponseProtocolError
    ) -> layer.CommandGenerator[None]:
        if (
            isinstance(event, RequestProtocolError)
            and self.flow.id in _live
            and self.server_state == self.state_stream_response_body
        ):
            # The client left mid-stream. mitmproxy would forward that to the
            # server connection, which an addon-produced response never had.
            _live.discard(self.flow.id)
            if self.context.options.store_streamed_bodies and self.flow.response is not None:
                # What the client got before it left (mitmproxy's own stream drops it).
                self.flow.response.data.content = bytes(self.response_body_buf)
                self.response_body_buf.clear()
            self.flow.error = mitmflow.Error(event.message)
            yield HttpErrorHook(self.flow)
            self.flow.live = False
            self.client_state = self.server_state = self.state_errored
            yield DropStream(self.stream_id)
            return
        yield from super().handle_protocol_error(event)

    def flow_done(self) -> layer.CommandGenerator[None]:
        answered = self.flow.metadata.get(METADATA_KEY, {}).get("role") == "client"
        _live.discard(self.flow.id)
        _consumed.pop(self.flow.id, None)
        factory = _websockets.pop(self.flow.id, None)
        response = self.flow.response
        upgraded = response is not None and response.status_code == 101
        if factory is not None and upgraded and self.flow.websocket is not None:
            # The addon answered the upgrade: its layer, not mitmproxy's relay, has the
            # client's socket (there is no server connection to relay to).
            self.child_layer = factory(self.context, self.flow)
            self._handle_event = self.passthrough
            yield from self.child_layer.handle_event(events.Start())
            yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
            return
        yield from super().flow_done()
        if answered and not upgraded:
            # The stream is over and dropped, but mitmproxy's layers are reference cycles
            # (bound methods) that only the full collection frees: the flow, its request
            # and answer bodies, need not wait for it too.
            del self.flow


_original_handle_event = getattr(HttpLayer, "_handle_event", None)


def _handle_event(self: HttpLayer, event: events.Event) -> layer.CommandGenerator[None]:
    if isinstance(event, FlowEvent):
        return _route(self, event)
    assert _original_handle_event is not None
    result: layer.CommandGenerator[None] = _original_handle_event(self, event)
    return result


def _route(self: HttpLayer, event: FlowEvent) -> Generator[Any, Any, None]:
    if isinstance(event, _Feed):
        delivered = yield from _feed_stream(self, event)
        if delivered:
            return
    # A CONNECT tunnel (or an upgraded stream) holds the flow's layer further down.
    for stream in list(self.streams.values()):
        if stream.child_layer is not None and stream._handle_event == stream.passthrough:
            yield from self.event_to_child(stream, event)


def _feed_stream(self: HttpLayer, event: _Feed) -> Generator[Any, Any, bool]:
    """Delivers a body chunk to its flow's stream; False when the flow is further down."""
    for stream in list(self.streams.values()):
        if getattr(stream, "flow", None) is not event.flow:
            continue
        if stream._handle_event == stream.passthrough:
            return False
        if not (stream._paused or stream.server_state == stream.state_stream_response_body):
            return True  # the stream already ended (the client left): nothing to deliver
        inner: events.Event
        if event.error is not None:
            inner = ResponseProtocolError(
                stream.stream_id, event.error, ErrorCode.GENERIC_SERVER_ERROR
            )
        elif event.data is None:
            inner = ResponseEndOfMessage(stream.stream_id)
        else:
            inner = ResponseData(stream.stream_id, event.data)
        yield from self.event_to_child(stream, inner)
        if event.count_unsent:
            event.unsent = _unsent_of(self, stream)
        return True
    return False


# What this module (and the bridge's hooks) call, override or compare with: methods
# and class attributes, by name.
_ATTRIBUTES: tuple[tuple[type, tuple[str, ...]], ...] = (
    (
        HttpStream,
        (
            "_handle_event",
            "start_request_stream",
            "state_consume_request_body",
            "check_killed",
            "send_response",
            "start_response_stream",
            "handle_protocol_error",
            "flow_done",
            "passthrough",
            "state_wait_for_response_headers",
            "state_stream_response_body",
            "state_done",
            "state_errored",
        ),
    ),
    (HttpLayer, ("_handle_event", "event_to_child", "make_stream")),
    (ConnectionHandler, ("server_event", "drain_writers")),
    (Proxyserver, ("listen_addrs",)),
)
# Instance attributes it reads, known by the classes' annotations.
_DECLARED: tuple[tuple[type, tuple[str, ...]], ...] = (
    (layer.Layer, ("context", "_paused", "_paused_event_queue")),
    (HttpStream, ("flow", "stream_id", "child_layer", "response_body_buf")),
    (HttpLayer, ("streams", "connections")),
    (Http2Connection, ("h2_conn",)),
    (BufferedH2Connection, ("stream_buffers",)),
    (ConnectionHandler, ("client", "transports")),
    (ConnectionIO, ("handler", "writer")),
    (Proxyserver, ("connections",)),
)
# Code it relies on the shape of: a method and the names it must still use.
# `state_collect_request_body` ends a body as `state_consume_request_body` does.
_USES: tuple[tuple[type, str, tuple[str, ...]], ...] = (
    (
        HttpStream,
        "state_consume_request_body",
        (
            "state_done",
            "HttpRequestHook",
            "check_killed",
            "HttpResponseHeadersHook",
            "send_response",
        ),
    ),
    (HttpStream, "__init__", ("client_state", "server_state")),
    # A client that leaves mid-answer keeps what it got as this keeps a finished answer.
    (HttpStream, "state_stream_response_body", ("store_streamed_bodies", "response_body_buf")),
    # An upgrade the addon answers gets its own child layer as `flow_done` gives mitmproxy's.
    (HttpStream, "flow_done", ("child_layer", "passthrough", "SendHttp", "ResponseEndOfMessage")),
    # A new stream's class is looked up by its module-level name, which install() replaces.
    (HttpLayer, "make_stream", ("HttpStream",)),
    # `FlowSink.write_now` runs server_event at once when its lock is free: it awaits
    # nothing else (mitmproxy's own comment says so).
    (ConnectionHandler, "server_event", ("_server_event_lock",)),
)


def missing_internals() -> list[str]:
    """The mitmproxy internals this module needs that the installed mitmproxy lacks."""
    missing = [
        f"{owner.__name__}.{name}"
        for owner, names in _ATTRIBUTES
        for name in names
        if not hasattr(owner, name)
    ]
    missing += [
        f"{owner.__name__}.{name}"
        for owner, names in _DECLARED
        for name in names
        if not any(name in inspect.get_annotations(k) for k in owner.__mro__)
    ]
    for owner, method, names in _USES:
        used = _names_used(getattr(owner, method, None))
        missing += [f"{name} in {owner.__name__}.{method}" for name in names if name not in used]
    if getattr(http_layers, "HttpStream", None) not in (HttpStream, _AddonStream):
        missing.append("mitmproxy.proxy.layers.http.HttpStream")
    return missing


def _names_used(function: object) -> tuple[str, ...]:
    code = getattr(inspect.unwrap(function), "__code__", None) if callable(function) else None
    return code.co_names if code is not None else ()


def internals_problem() -> str | None:
    """Why answers cannot stream in the installed mitmproxy (what it lacks), or None."""
    missing = missing_internals()
    if not missing:
        return None
    return (
        f"mitmproxy {version.VERSION} lacks what the bridge streams its answers with "
        f"({', '.join(missing)}); the bridge needs {SUPPORTED}"
    )


def _unsent_of(http_layer: HttpLayer, stream: HttpStream) -> Callable[[], int]:
    """Counts what of `stream`'s response mitmproxy holds for the client, not yet sent.

    Chunks queued while the stream waits for a hook, and over HTTP/2 the data
    mitmproxy's h2 connection buffers beyond the client's flow-control window
    (stream or connection). Over HTTP/1.1 mitmproxy holds nothing: it writes to
    the socket, whose buffer `drain_writers` waits on.
    """
    client = http_layer.connections.get(http_layer.context.client)
    buffers = client.h2_conn.stream_buffers if isinstance(client, Http2Connection) else None
    queue, stream_id = stream._paused_event_queue, stream.stream_id

    def unsent() -> int:
        # Asked before every write: nothing queued and no h2 buffers is the common case.
        held = sum(len(e.data) for e in queue if isinstance(e, ResponseData)) if queue else 0
        chunks = buffers.get(stream_id) if buffers is not None else None
        if chunks:
            held += sum(len(chunk.data) for chunk in chunks)
        return held

    return unsent


def installed() -> bool:
    """Whether mitmproxy's HTTP layer streams addon-produced bodies in this process."""
    return _installed


def install() -> None:
    """Patches mitmproxy's HTTP layer once per process.

    Raises `OptionsError` (and patches nothing) when the installed mitmproxy
    lacks any internal this module touches.
    """
    global _installed
    problem = internals_problem()
    if problem is not None:
        raise exceptions.OptionsError(problem)
    if _installed:
        return
    # HttpLayer.make_stream looks the class up by module name for every new stream.
    http_layers.HttpStream = _AddonStream  # type: ignore[misc]
    HttpLayer._handle_event = _handle_event  # type: ignore[method-assign]
    _installed = True


@dataclass(frozen=True)
class Head:
    """How the response starts: streamed (`body` None) or whole."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes | None = None


# A body write goes in pieces of at most PIECE bytes, and returns only once at
# most UNSENT_LIMIT bytes of the response wait in mitmproxy for the client: no
# more than UNSENT_LIMIT + PIECE (320 KiB) per response are ever held there.
PIECE = 64 * 1024
UNSENT_LIMIT = 256 * 1024
# How often a held-up write looks again: from the first pause, doubling up to the last.
_FIRST_PAUSE_S = 0.001
_LAST_PAUSE_S = 0.05


class FlowSink:
    """The service's answer for one flow, delivered through mitmproxy's own connection.

    `head` resolves with the status and headers (and the whole body, for a
    response with a known length); the `request` hook awaits it and sets
    `flow.response`. Streamed chunks go in as `_Feed` events. A write returns
    once the client has taken enough of them: mitmproxy's write buffers
    drained (`drain_writers`, the socket) and at most `UNSENT_LIMIT` bytes held
    in its HTTP layer (HTTP/2: beyond the client's flow-control window). So a
    slow client slows the relay, and with it the upstream, down; a client
    that leaves ends the wait (`ClientGone`), as does mitmproxy's inactivity
    timeout (`tcp_timeout`) for one that stays silent.
    """

    def __init__(self, flow: http.HTTPFlow) -> None:
        self._flow = flow
        self.head: asyncio.Future[Head] = asyncio.get_running_loop().create_future()
        self.started = False
        self.finished = False
        self.status: int | None = None
        # The most bytes seen held for the client after a write, and the writes that waited.
        self.unsent_peak = 0
        self.held_up_writes = 0
        self._unsent: Callable[[], int] = lambda: 0
        self._counting = False

    async def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        self._begin(Head(status, tuple(headers)))
        _live.add(self._flow.id)

    async def write(self, data: bytes) -> None:
        for start in range(0, len(data), PIECE):
            await self._feed(self._event(data[start : start + PIECE]))
            await self._until_taken()

    def write_now(self, data: bytes) -> bool:
        """Writes at once, from a callback; False (nothing written) when the client is
        behind (its socket's buffer full, or too much held in the HTTP layer) or a
        server_event is running: then `write`, which waits."""
        if self._flow.id not in _live:
            raise ClientGone
        handler = self._handler()
        if len(data) > PIECE or not _free(handler._server_event_lock) or self._behind(handler):
            return False
        event = self._event(data)
        step = handler.server_event(event)
        try:
            waited = step.send(None)
        except StopIteration:
            pass
        else:
            # Its lock was taken after all: it finishes in the lock's order, as a task would.
            _go_on(step, waited)
        self._learn_unsent(event)
        if self._flow.id not in _live:
            raise ClientGone
        return True

    def _behind(self, handler: ConnectionHandler) -> bool:
        if self._unsent() > UNSENT_LIMIT:
            return True
        for io in handler.transports.values():
            transport = getattr(io.writer, "transport", None)
            if transport is None:
                continue
            if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
                return True
        return False

    async def finish(self) -> None:
        self.finished = True
        await self._feed(self._event(None))

    async def respond(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        self._begin(Head(status, tuple(headers), body))
        self.finished = True

    async def abort(self, reason: str) -> None:
        """The producer failed after the headers went out: cut the response."""
        if self.started and not self.finished and self._flow.id in _live:
            self.finished = True
            await self._feed(_Feed(self._flow, error=reason))

    def _begin(self, head: Head) -> None:
        self.status = head.status
        self.started = True
        if not self.head.done():
            self.head.set_result(head)

    def _handler(self) -> ConnectionHandler:
        handler = ctx.master.addons.get("proxyserver").connections.get(self._flow.client_conn.id)
        if handler is None:
            raise ClientGone
        return handler  # type: ignore[no-any-return]

    async def _feed(self, event: _Feed) -> None:
        if self._flow.id not in _live:
            raise ClientGone
        handler = self._handler()
        await handler.server_event(event)
        self._learn_unsent(event)
        await handler.drain_writers()

    def _event(self, data: bytes | None) -> _Feed:
        return _Feed(self._flow, data, count_unsent=not self._counting)

    def _learn_unsent(self, event: _Feed) -> None:
        if event.unsent is not None:
            self._unsent, self._counting = event.unsent, True

    async def _until_taken(self) -> None:
        """Waits while more than `UNSENT_LIMIT` bytes wait in mitmproxy for the client."""
        pause = _FIRST_PAUSE_S
        while True:
            if self._flow.id not in _live:
                raise ClientGone
            unsent = self._unsent()
            self.unsent_peak = max(self.unsent_peak, unsent)
            if unsent <= UNSENT_LIMIT:
                return
            if pause == _FIRST_PAUSE_S:
                self.held_up_writes += 1
            await asyncio.sleep(pause)
            pause = min(pause * 2, _LAST_PAUSE_S)


def _free(lock: asyncio.Lock) -> bool:
    """Whether acquiring `lock` now would not wait (asyncio.Lock's own fast path)."""
    waiters = getattr(lock, "_waiters", None)
    return not lock.locked() and (not waiters or all(w.cancelled() for w in waiters))


def _go_on(step: Coroutine[Any, Any, None], waited: Any) -> None:
    """Resumes a coroutine that waited on the future `waited`, without a task."""

    def wake(_: object) -> None:
        try:
            _go_on(step, step.send(None))
        except StopIteration:
            pass
        except Exception:
            logger.exception("bridge: a body write failed")

    waited.add_done_callback(wake)


def serve_websocket(flow: http.HTTPFlow, factory: LayerFactory) -> None:
    """From `request`: the addon answers this upgrade itself, and `factory` makes the layer
    that holds the client's socket once its 101 went out."""
    _websockets[flow.id] = factory


def consume_body(flow: http.HTTPFlow, collector: BodyCollector | None) -> None:
    """From `requestheaders`: the addon takes the body (None: drops it, answered already)."""
    if collector is not None:
        flow.request.stream = collector
    else:
        flow.request.stream = _drop
    _consumed[flow.id] = collector


def _drop(chunk: bytes) -> bytes:
    return b""


def _response(error: HttpError) -> http.Response:
    headers = http.Headers([(k.encode(), v.encode()) for k, v in error.headers])
    return make_response(error.status, error.body, headers)


def forget(flow: http.HTTPFlow) -> None:
    """The flow ended (response sent, or an error): it streams no more."""
    _live.discard(flow.id)
    _consumed.pop(flow.id, None)
    _websockets.pop(flow.id, None)


def close_left_open(client: connection.Client) -> None:
    """Once mitmproxy is done with a client (`client_disconnected`): closes a socket it left open.

    mitmproxy closes a client connection by cancelling the task that reads it,
    and that task closes the socket on its way out, unless the cancel lands
    while it waits for the connection's event lock: then the socket stays open
    until garbage collection. That is what happens to an early answer whose
    client keeps sending its body (`connection: close`, and a held socket).
    """
    proxyserver = ctx.master.addons.get("proxyserver") if ctx.master is not None else None
    handler = proxyserver.connections.get(client.id) if proxyserver is not None else None
    io = handler.transports.get(client) if handler is not None else None
    if io is None or io.writer is None or (io.handler is not None and not io.handler.done()):
        return
    if not io.writer.is_closing():
        io.writer.close()
