"""Records every upstream WebSocket session as a live mitmproxy flow.

The bridge's upstream connections are its own, so mitmproxy never sees them.
A `SessionFlowTap` per connection builds a standard `HTTPFlow` with WebSocket
data (the handshake as sent, the 101 or the rejection as received, every
message with its timestamp, the close) and feeds it through mitmproxy's hooks
(`requestheaders`, `request`, `responseheaders`, `response`, `websocket_start`,
`websocket_end` or `error`), so it shows in mitmweb and the console next to the
client flow it served and `-w` saves it like any flow.

Messages are appended as they pass; to keep the per-event cost of a long
stream low, the view is refreshed at most every `UPDATE_INTERVAL_S` per flow
instead of running every addon's `websocket_message` hook once per event.
Credentials are redacted (`Bearer <redacted:ACCOUNT_ID>`) unless disabled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import connection, flow, hooks, http
from mitmproxy.proxy.layers.http._hooks import (
    HttpErrorHook,
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
)
from mitmproxy.proxy.layers.websocket import WebsocketEndHook, WebsocketStartHook
from mitmproxy.websocket import WebSocketData, WebSocketMessage
from websockets.http11 import Request, Response
from wsproto.frame_protocol import Opcode

from addon.bridge_service import Attempt, Turn
from addon.handshake_headers import redact_secrets

logger = logging.getLogger(__name__)

METADATA_KEY = "responses_bridge"
UPDATE_INTERVAL_S = 0.25
# Header values that are credentials wherever they appear.
_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "openai-api-key"}
)

Emit = Callable[[hooks.Hook], None]


def redact_headers(
    headers: Sequence[tuple[str, str]], *, account_id: str | None, secrets: Collection[str]
) -> list[tuple[str, str]]:
    """Headers safe to keep in a flow file: credentials replaced, the account id kept."""
    out = []
    for name, value in headers:
        low = name.lower()
        if low == "authorization" and value.lower().startswith("bearer "):
            value = f"Bearer <redacted:{account_id or 'client'}>"
        elif low in _CREDENTIAL_HEADERS:
            value = "<redacted>"
        else:
            for secret in secrets:
                if secret and secret in value:
                    value = value.replace(secret, "<redacted>")
            value = redact_secrets(value)
        out.append((name, value))
    return out


def _headers(pairs: Sequence[tuple[str, str]]) -> http.Headers:
    return http.Headers([(k.encode("latin-1", "replace"), v.encode("utf-8")) for k, v in pairs])


class SessionFlowTap:
    """Implements `upstream_client.SessionTap` for one upstream connection."""

    def __init__(
        self,
        *,
        url: str,
        turn: Turn,
        attempt: Attempt,
        emit: Emit,
        redact: bool,
        secrets: Collection[str],
    ) -> None:
        self._emit = emit
        self._redact = redact
        self._secrets = secrets
        self._account = attempt.account
        self._last_update = 0.0
        self.flow = self._new_flow(url, turn, attempt)
        attempt.upstream_flow = self.flow.id

    # -- building ------------------------------------------------------------

    def _new_flow(self, url: str, turn: Turn, attempt: Attempt) -> http.HTTPFlow:
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        host = parts.hostname or ""
        now = time.time()
        client = connection.Client(
            peername=("127.0.0.1", 0), sockname=("127.0.0.1", 0), timestamp_start=now
        )
        server = connection.Server(address=(host, port), timestamp_start=now)
        upstream = http.HTTPFlow(client, server)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        upstream.request = http.Request(
            host=host,
            port=port,
            method=b"GET",
            scheme=b"https" if secure else b"http",
            authority=b"",
            path=path.encode(),
            http_version=b"HTTP/1.1",
            headers=http.Headers(),
            content=b"",
            trailers=None,
            timestamp_start=now,
            timestamp_end=now,
        )
        affinity = turn.affinity
        upstream.metadata[METADATA_KEY] = {
            "role": "upstream",
            "account": attempt.account,
            "affinity": affinity.kind.value,
            "key": affinity.key,
            "attempt": attempt.number,
            "client_flow": turn.flow_id,
            "client_flows": [turn.flow_id],
            "request_id": turn.request_id,
            "reused": False,
        }
        upstream.comment = self._comment(turn, attempt)
        upstream.marked = ":link:"
        return upstream

    @staticmethod
    def _comment(turn: Turn, attempt: Attempt) -> str:
        affinity = turn.affinity
        kind = affinity.kind.value + (f" {affinity.key}" if affinity.key else "")
        return (
            f"upstream session · account {attempt.account or '(client credential)'} · {kind}"
            f" · attempt {attempt.number} · client flow {turn.flow_id[:8]}"
        )

    def _safe(self, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        if not self._redact:
            return list(headers)
        return redact_headers(headers, account_id=self._account, secrets=self._secrets)

    # -- SessionTap ----------------------------------------------------------------

    def attach(self, context: object) -> None:
        if not isinstance(context, tuple) or len(context) != 2:
            return
        turn, attempt = context[0], context[1]
        if not isinstance(turn, Turn) or not isinstance(attempt, Attempt):
            return
        attempt.upstream_flow = self.flow.id
        meta: dict[str, Any] = self.flow.metadata[METADATA_KEY]
        meta["client_flows"].append(turn.flow_id)
        meta["reused"] = True
        self.flow.comment += f"\nreused · attempt {attempt.number} · client flow {turn.flow_id[:8]}"
        self._update(force=True)

    def handshake_done(
        self, request: Request | None, response: Response | None, error: str | None
    ) -> None:
        upstream = self.flow
        now = time.time()
        if request is not None:
            upstream.request.headers = _headers(self._safe(list(request.headers.raw_items())))
        self._emit(HttpRequestHeadersHook(upstream))
        self._emit(HttpRequestHook(upstream))
        if response is None:
            upstream.error = flow.Error(error or "no response from the upstream")
            self._emit(HttpErrorHook(upstream))
            return
        upstream.server_conn.timestamp_tcp_setup = now
        upstream.response = http.Response(
            http_version=b"HTTP/1.1",
            status_code=response.status_code,
            reason=response.reason_phrase.encode(),
            headers=_headers(self._safe(list(response.headers.raw_items()))),
            content=bytes(response.body or b""),
            trailers=None,
            timestamp_start=now,
            timestamp_end=now,
        )
        self._emit(HttpResponseHeadersHook(upstream))
        if response.status_code == 101:
            upstream.websocket = WebSocketData()
            self._emit(HttpResponseHook(upstream))
            self._emit(WebsocketStartHook(upstream))
        else:
            self._emit(HttpResponseHook(upstream))

    def message(self, from_client: bool, data: str | bytes, timestamp: float) -> None:
        websocket = self.flow.websocket
        if websocket is None:
            return
        content = data.encode() if isinstance(data, str) else data
        if self._redact and self._secrets:
            text = content.decode("utf-8", "replace")
            if any(s and s in text for s in self._secrets):
                for secret in self._secrets:
                    text = text.replace(secret, "<redacted>")
                content = text.encode()
        websocket.messages.append(WebSocketMessage(Opcode.TEXT, from_client, content, timestamp))
        self._update()

    def closed(
        self, code: int | None, reason: str, closed_by_client: bool, timestamp: float
    ) -> None:
        websocket = self.flow.websocket
        if websocket is None:
            return
        websocket.close_code = code if code is not None else 1006
        websocket.close_reason = reason
        websocket.closed_by_client = closed_by_client
        websocket.timestamp_end = timestamp
        self.flow.server_conn.timestamp_end = timestamp
        self._emit(WebsocketEndHook(self.flow))

    def _update(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_update >= UPDATE_INTERVAL_S:
            self._last_update = now
            self._emit(hooks.UpdateHook([self.flow]))


class HookEmitter:
    """Runs hooks on mitmproxy's addons in order, one at a time, off the hot path."""

    def __init__(self, trigger: Callable[[hooks.Hook], Any]) -> None:
        self._trigger = trigger
        self._queue: asyncio.Queue[hooks.Hook] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def __call__(self, hook: hooks.Hook) -> None:
        self._queue.put_nowait(hook)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self._queue.empty():
            hook = self._queue.get_nowait()
            try:
                await self._trigger(hook)
            except Exception:
                logger.exception("recording hook %s failed", hook.name)

    async def drain(self, timeout: float = 5.0) -> None:
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=timeout)
