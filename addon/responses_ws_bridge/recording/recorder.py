"""Records every upstream WebSocket session as a live mitmproxy flow.

The bridge's upstream connections are its own, so mitmproxy never sees them.
A `SessionFlowTap` per connection builds a standard `HTTPFlow` with WebSocket
data (the handshake as sent, the 101 or the rejection as received, every
message with its timestamp, the close) and feeds it through mitmproxy's hooks
(`requestheaders`, `request`, `responseheaders`, `response`, `websocket_start`,
`websocket_end` or `error`), so it shows in mitmweb and the console next to the
client flow it served and `-w` saves it like any flow.

A socket reused across turns is recorded as one flow per turn (see
`session_flows`). A turn's flow lasts until the socket's next turn starts
(`attach`), which ends it with `websocket_end` (when `-w` writes it) and
starts the next one, or until the socket closes, whatever the time: the
close, with its real code, is the last turn's, so no flow stands for a socket
that carried no request. An idle socket holds its last turn's messages only,
never more. Messages are appended as they pass;
to keep the per-event cost of a stream low, flows with new messages are
refreshed together, one `update` hook every `UPDATE_INTERVAL_S` for all of
them, instead of running every addon's `websocket_message` hook once per event.
Credentials are redacted (`Bearer <redacted:ACCOUNT_ID>`) unless disabled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from mitmproxy import hooks, http
from mitmproxy.flow import Flow
from mitmproxy.proxy.layers.http import (
    HttpErrorHook,
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
)
from mitmproxy.proxy.layers.websocket import WebsocketEndHook, WebsocketStartHook
from websockets.http11 import Request, Response

from responses_ws_bridge.core.redaction import SecretScrubber
from responses_ws_bridge.core.turns import Attempt, Turn
from responses_ws_bridge.recording import session_flows

logger = logging.getLogger(__name__)

UPDATE_INTERVAL_S = 0.5


class SessionFlowTap:
    """Implements `upstream_client.SessionTap` for one upstream connection."""

    def __init__(
        self,
        *,
        turn: Turn,
        attempt: Attempt,
        emit: HookEmitter,
        redact: bool,
        secrets: Collection[str],
    ) -> None:
        self._url = attempt.url
        # Only what the recording needs: the turn (its 40 KB body) and the client
        # flow would otherwise live as long as the socket.
        self._affinity = turn.affinity
        self._client_flow_id = turn.flow_id
        self._attempt = attempt
        self._emit = emit
        self._redact = redact
        self._secrets = secrets if redact else ()
        # Messages, close reasons: the upstream's text may echo a credential. One C-level
        # scan per message tells whether anything needs replacing.
        self._scrub = SecretScrubber(self._secrets) if redact else None
        # The segment being recorded: the current turn's, or the last one's while idle.
        self.flow: http.HTTPFlow | None = None
        # The segment's turn is over; the next turn on the socket gets a segment of its own.
        self._turn_over = False
        self._handshake: tuple[list[tuple[str, str]], Response] | None = None
        # The last segment that ended: its id and metadata, for the next one.
        self._last: tuple[str, dict[str, Any]] | None = None

    # -- SessionTap ----------------------------------------------------------------

    def handshake_done(
        self, request: Request | None, response: Response | None, error: str | None
    ) -> None:
        now = time.time()
        affinity = self._affinity
        headers = list(request.headers.raw_items()) if request is not None else []
        upstream = session_flows.new_upstream_flow(
            url=self._url,
            headers=headers,
            timestamp=now,
            meta=session_flows.UpstreamMeta(
                account=self._attempt.account,
                affinity=affinity.kind.value,
                key=affinity.key,
                attempt=self._attempt.number,
            ),
            client_flow_id=self._client_flow_id,
            secrets=self._secrets,
        )
        self._attempt.upstream_flow = upstream.id
        if response is None:
            self._show_request(upstream, headers)
            session_flows.record_error(upstream, error or "no response from the upstream")
            self._emit(HttpErrorHook(upstream))
            return
        # Kept for the socket's later segments; the connection holds both anyway.
        self._handshake = (headers, response)
        self._start(upstream, now)

    def attach(self, turn: Turn, attempt: Attempt) -> None:
        flow = self.flow
        if flow is not None and self._turn_over and flow.websocket is not None:
            # The last turn's segment ends (and is saved) as the socket's next turn starts.
            session_flows.end_segment(flow, timestamp=time.time())
            self._last = (flow.id, flow.metadata[session_flows.METADATA_KEY])
            self.flow = None
            self._emit(WebsocketEndHook(flow))
            self._next_segment(turn.flow_id, attempt.number)
        elif flow is not None:
            session_flows.note_reuse(flow, client_flow_id=turn.flow_id, attempt=attempt.number)
            self._emit.touch(flow)
        self._turn_over = False
        if self.flow is not None:
            attempt.upstream_flow = self.flow.id

    def idle(self) -> None:
        # The segment stays open: what the socket does next (a close, an event) is its.
        self._turn_over = True

    def message(self, from_client: bool, data: str | bytes, timestamp: float) -> None:
        if self.flow is None or self.flow.websocket is None:
            return
        session_flows.record_message(
            self.flow,
            from_client=from_client,
            content=self._recorded(data),
            timestamp=timestamp,
            text=True,
        )
        self._emit.touch(self.flow)

    def _recorded(self, data: str | bytes) -> bytes:
        """A message as recorded: text, scrubbed. Bytes that need no change are kept as they
        are, so the turn's `response.create` (as large as its request) is not copied."""
        if isinstance(data, str):
            return self._scrubbed(data).encode("utf-8", "surrogateescape")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return self._scrubbed(data.decode("utf-8", "replace")).encode()
        scrubbed = self._scrubbed(text)
        return data if scrubbed is text else scrubbed.encode()

    def _scrubbed(self, text: str) -> str:
        return self._scrub.known(text) if self._scrub is not None else text

    def closed(
        self, code: int | None, reason: str, closed_by_client: bool, timestamp: float
    ) -> None:
        if self.flow is None or self.flow.websocket is None:
            return
        session_flows.record_close(
            self.flow,
            code=code,
            reason=self._scrub(reason) if self._scrub is not None else reason,
            closed_by_client=closed_by_client,
            timestamp=timestamp,
        )
        self._emit(WebsocketEndHook(self.flow))

    # -- helpers -------------------------------------------------------------------

    def _show_request(self, upstream: http.HTTPFlow, headers: list[tuple[str, str]]) -> None:
        if not self._redact:
            upstream.request.headers = http.Headers(
                [(k.encode("latin-1"), v.encode()) for k, v in headers]
            )
        self.flow = upstream
        self._emit(HttpRequestHeadersHook(upstream))
        self._emit(HttpRequestHook(upstream))

    def _start(self, upstream: http.HTTPFlow, now: float) -> None:
        """Shows a segment: its request, the socket's handshake answer, the WebSocket start."""
        assert self._handshake is not None
        headers, response = self._handshake
        self._show_request(upstream, headers)
        session_flows.record_handshake_response(
            upstream,
            status=response.status_code,
            reason=response.reason_phrase,
            headers=list(response.headers.raw_items()),
            body=bytes(response.body or b""),
            timestamp=now,
            secrets=self._secrets,
        )
        self._emit(HttpResponseHeadersHook(upstream))
        self._emit(HttpResponseHook(upstream))
        if upstream.websocket is not None:
            self._emit(WebsocketStartHook(upstream))

    def _next_segment(self, client_flow_id: str | None, attempt: int) -> None:
        if self._handshake is None or self._last is None:
            return
        now = time.time()
        previous_id, previous_meta = self._last
        upstream = session_flows.next_segment(
            previous_meta,
            previous_id,
            url=self._url,
            headers=self._handshake[0],
            timestamp=now,
            client_flow_id=client_flow_id,
            attempt=attempt,
            secrets=self._secrets,
        )
        self._start(upstream, now)


class ExchangeFlowTap:
    """Implements `http_forward.ExchangeTap`: one forwarded HTTP exchange as a flow.

    The request shows as it was sent (credentials redacted) when the answer's
    head comes; the answer's body is kept as it streams, and the flow ends
    (`response`, which is when `-w` writes it) with the exchange, or with
    `error` when there was no answer.
    """

    # An answer kept for the flow; more is cut (the client still got all of it).
    MAX_BODY = 8 * 1024 * 1024

    def __init__(
        self,
        *,
        turn: Turn,
        attempt: Attempt,
        url: str,
        method: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        emit: HookEmitter,
        redact: bool,
        secrets: Collection[str],
    ) -> None:
        self._attempt = attempt
        self._emit = emit
        self._secrets = secrets if redact else ()
        route = turn.http.route.kind.value if turn.http is not None else ""
        self.flow = session_flows.new_exchange_flow(
            url=url,
            method=method,
            headers=headers,
            body=body,
            timestamp=time.time(),
            meta=session_flows.UpstreamMeta(
                account=attempt.account,
                affinity=turn.affinity.kind.value,
                key=turn.affinity.key,
                attempt=attempt.number,
            ),
            client_flow_id=turn.flow_id,
            route=route,
            secrets=self._secrets,
        )
        if not redact:
            self.flow.request.headers = http.Headers(
                [(k.encode("latin-1"), v.encode()) for k, v in headers]
            )
        attempt.upstream_flow = self.flow.id
        self._head: tuple[int, str, list[tuple[str, str]]] | None = None
        self._body = bytearray()
        self._shown = False

    def answered(self, status: int, reason: str, headers: Sequence[tuple[str, str]]) -> None:
        self._head = (status, reason, list(headers))
        self._show()

    def body(self, data: bytes) -> None:
        room = self.MAX_BODY - len(self._body)
        if room > 0:
            self._body += data[:room]

    def ended(self, error: str | None) -> None:
        self._show()
        if self._head is None or error is not None:
            session_flows.record_error(self.flow, error or "no answer from the upstream")
            self._emit(HttpErrorHook(self.flow))
            return
        status, reason, headers = self._head
        session_flows.record_exchange_answer(
            self.flow,
            status=status,
            reason=reason,
            headers=headers,
            body=bytes(self._body),
            timestamp=time.time(),
            secrets=self._secrets,
        )
        self._emit(HttpResponseHeadersHook(self.flow))
        self._emit(HttpResponseHook(self.flow))

    def _show(self) -> None:
        if not self._shown:
            self._shown = True
            self._emit(HttpRequestHeadersHook(self.flow))
            self._emit(HttpRequestHook(self.flow))


class HookEmitter:
    """Runs hooks on mitmproxy's addons in order, one at a time, off the hot path.

    `trigger` runs one hook on the addons as mitmproxy's `AddonManager.trigger_event`
    does (`addons.recording.trigger_listeners`), with no `update` after it: the
    emitter sends those, one per batch of hooks.
    """

    def __init__(self, trigger: Callable[[hooks.Hook], Any]) -> None:
        self._trigger = trigger
        self._queue: asyncio.Queue[hooks.Hook] = asyncio.Queue()
        self._task: asyncio.Future[None] | None = None
        self._dirty: dict[str, http.HTTPFlow] = {}
        self._flush: asyncio.TimerHandle | None = None

    def touch(self, flow: http.HTTPFlow) -> None:
        """The flow changed (a message): refresh it with the others in a while."""
        self._dirty[flow.id] = flow
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(UPDATE_INTERVAL_S, self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._flush = None
        flows, self._dirty = list(self._dirty.values()), {}
        if flows:
            self(hooks.UpdateHook(flows))

    def __call__(self, hook: hooks.Hook) -> None:
        self._queue.put_nowait(hook)
        if self._task is None or self._task.done():
            # mitmproxy's eager task factory would run the hooks right here, on
            # the way to the client's first event; start them on the next turn.
            self._task = asyncio.get_running_loop().create_future()  # placeholder
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        placeholder = self._task
        self._task = asyncio.ensure_future(self._run())
        if placeholder is not None and not placeholder.done():
            placeholder.set_result(None)

    async def _run(self) -> None:
        # mitmproxy's own lifecycle follows every hook on a flow with an `update` of it;
        # here one `update` follows the hooks queued together, for every flow they were on.
        changed: dict[str, Flow] = {}
        while not self._queue.empty():
            hook = self._queue.get_nowait()
            await self._dispatch(hook)
            subject = hook.args()[0] if not isinstance(hook, hooks.UpdateHook) else None
            if isinstance(subject, Flow):
                changed[subject.id] = subject
            if self._queue.empty() and changed:
                update, changed = hooks.UpdateHook(list(changed.values())), {}
                await self._dispatch(update)

    async def _dispatch(self, hook: hooks.Hook) -> None:
        try:
            await self._trigger(hook)
        except Exception:
            logger.exception("recording hook %s failed", hook.name)

    async def drain(self, timeout: float = 5.0) -> None:
        """Runs what is queued (used when mitmproxy shuts down)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush_dirty()
        deadline = asyncio.get_running_loop().time() + timeout
        # The placeholder resolves once the real task started; then wait for that.
        while self._task is not None and not self._task.done():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.wait({self._task}, timeout=left)
