"""The bridge's mitmproxy hooks: picks out Responses requests and routes them to the service.

A bridged flow is answered by the loopback endpoint (see `shell.loopback`): the
`request` hook parses and checks the request, registers the turn under a
one-time token and points the flow at 127.0.0.1; `responseheaders` puts the
flow's original destination back (so mitmweb shows the URL the client used)
and streams the answer; `response` keeps the streamed SSE body for display and
writes the turn's report into the flow's metadata and comment.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import command, ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from responses_ws_bridge.addons.option_values import (
    MiB,
    not_negative,
    positive,
    seconds,
    table,
)
from responses_ws_bridge.core import openai_errors, routing
from responses_ws_bridge.core.accounts import client_key_ok
from responses_ws_bridge.core.affinity import classify
from responses_ws_bridge.core.create_request import BadRequest, parse_create_request
from responses_ws_bridge.core.handshake_headers import UpstreamCredential, client_request_id
from responses_ws_bridge.core.retry_policy import DEFAULT_RETRY_BUDGET
from responses_ws_bridge.core.turns import Destination, Turn
from responses_ws_bridge.shell.bridge_service import DEFAULT_SSE_KEEPALIVE_S, BridgeService
from responses_ws_bridge.shell.loopback import TOKEN_HEADER, LoopbackServer
from responses_ws_bridge.shell.session_pool import DEFAULT_IDLE_TTL_S
from responses_ws_bridge.shell.turn_metrics import TurnMetrics, observe

logger = logging.getLogger(__name__)

METADATA_KEY = "responses_bridge"
DEFAULT_MAX_BODY = 32 * MiB
READY_LINE = "Responses bridge ready"
OPTIONS = (
    "bridge_upstream",
    "bridge_max_body",
    "bridge_sse_keepalive",
    "bridge_retry_budget",
    "bridge_session_idle_ttl",
)


@dataclass
class _Routed:
    """A flow currently detoured through the loopback endpoint."""

    token: str
    turn: Turn
    body: bytearray = field(default_factory=bytearray)


class _Tap:
    """Keeps a copy of the streamed body so mitmweb can show it afterwards."""

    def __init__(self, buffer: bytearray) -> None:
        self._buffer = buffer

    def __call__(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        return chunk


class ResponsesBridge:
    def __init__(self, service: BridgeService) -> None:
        self.service = service
        self.loopback = LoopbackServer()
        self.max_body = DEFAULT_MAX_BODY
        self._routed: dict[str, _Routed] = {}
        # Where finished turns are counted (the metrics addon, when `bridge_metrics` is on).
        self.metrics: Callable[[], TurnMetrics | None] = lambda: None

    # -- options -----------------------------------------------------------

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "bridge_upstream",
            str,
            "",
            "Upstream Responses WebSocket URL for every bridged request (ws:// or wss://). "
            "Empty: the account's upstream, else the request's own destination (https→wss).",
        )
        loader.add_option(
            "bridge_max_body",
            int,
            DEFAULT_MAX_BODY,
            "Largest Responses request body the bridge accepts, in bytes (larger: 413).",
        )
        loader.add_option(
            "bridge_sse_keepalive",
            str,
            f"{DEFAULT_SSE_KEEPALIVE_S:g}",
            "Seconds of upstream silence after which an SSE comment is sent (0: never).",
        )
        loader.add_option(
            "bridge_retry_budget",
            int,
            DEFAULT_RETRY_BUDGET,
            "Retries of a request whose upstream failed before the client saw any event.",
        )
        loader.add_option(
            "bridge_session_idle_ttl",
            str,
            f"{DEFAULT_IDLE_TTL_S:g}",
            "Seconds an upstream WebSocket stays open after a turn, for the next request of "
            "the same affinity key and account (0: no reuse).",
        )

    def configure(self, updated: set[str]) -> None:
        if not updated.intersection(OPTIONS):
            return
        opts = ctx.options
        if opts.bridge_upstream:
            try:
                routing.validate_upstream_option(opts.bridge_upstream)
            except ValueError as exc:
                raise exceptions.OptionsError(f"bridge_upstream: {exc}") from exc
        settings = dataclasses.replace(
            self.service.settings,
            upstream_option=opts.bridge_upstream,
            sse_keepalive_s=seconds(opts, "bridge_sse_keepalive") or None,
            retry_budget=not_negative(opts, "bridge_retry_budget"),
            session_idle_ttl_s=seconds(opts, "bridge_session_idle_ttl"),
        )
        self.max_body = positive(opts, "bridge_max_body")
        self.service.apply_settings(settings)

    # -- lifecycle -----------------------------------------------------------

    async def running(self) -> None:
        port = await self.loopback.start()
        logger.info("%s (loopback endpoint on 127.0.0.1:%d)", READY_LINE, port)

    async def done(self) -> None:
        await self.service.shutdown()
        await self.loopback.stop()

    # -- hooks -----------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self._wants(flow):
            return
        length = flow.request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            # Refuse before mitmproxy reads a body we would refuse anyway.
            self._answer(flow, openai_errors.request_too_large(int(length), self.max_body))

    def request(self, flow: http.HTTPFlow) -> None:
        if not self._wants(flow) or flow.response is not None:
            return
        if not self.loopback.running:
            self._answer(flow, openai_errors.bridge_not_ready())
            return
        state = self.service.state
        accounts = state.config
        if accounts is not None and not client_key_ok(
            accounts, flow.request.headers.get("authorization")
        ):
            self._answer(flow, openai_errors.unauthorized_client_key())
            return
        body = flow.request.raw_content
        if body is None:  # streamed by mitmproxy (stream_large_bodies): too large for us
            self._answer(flow, openai_errors.request_too_large(None, self.max_body))
            return
        try:
            create = parse_create_request(
                flow.request.get_content(strict=False) or b"", max_body=self.max_body
            )
        except BadRequest as exc:
            self._answer(flow, openai_errors.bad_request(exc))
            return
        headers = tuple(flow.request.headers.items(multi=True))
        request_id = client_request_id(headers) or f"req_{uuid.uuid4().hex}"
        destination = Destination(
            flow.request.scheme, flow.request.host, flow.request.port, flow.request.path
        )
        turn = Turn(
            flow_id=flow.id,
            create=create,
            client_headers=headers,
            request_id=request_id,
            destination=destination,
            affinity=classify(headers, create.body),
            client_credential=(None if state.pooled else _client_credential(flow.request.headers)),
        )
        service, metrics = self.service, self.metrics()
        if metrics is None:
            token = self.loopback.register(lambda sink: service.serve(turn, sink))
        else:
            token = self.loopback.register(lambda sink: observe(service.serve, turn, sink, metrics))
        self._routed[flow.id] = _Routed(token, turn)
        # Detour to the loopback endpoint. `data.*` leaves the Host header as
        # the client sent it; the destination is restored in responseheaders.
        flow.request.data.scheme = b"http"
        flow.request.data.host = "127.0.0.1"
        flow.request.data.port = self.loopback.port
        flow.request.headers[TOKEN_HEADER] = token
        flow.metadata[METADATA_KEY] = {
            "role": "client",
            "request_id": request_id,
            "affinity": turn.affinity.kind.value,
            "key": turn.affinity.key,
        }

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        routed = self._routed.get(flow.id)
        if routed is None or flow.response is None:
            return
        self._restore(flow, routed)
        flow.response.stream = _Tap(routed.body)

    def response(self, flow: http.HTTPFlow) -> None:
        routed = self._routed.pop(flow.id, None)
        if routed is None or flow.response is None:
            return
        flow.response.content = bytes(routed.body)
        self._annotate(flow, routed)

    def error(self, flow: http.HTTPFlow) -> None:
        routed = self._routed.pop(flow.id, None)
        if routed is not None:
            self.loopback.discard(routed.token)
            self._restore(flow, routed)
            self._annotate(flow, routed)

    # -- commands ----------------------------------------------------------------

    @command.command("bridge.sessions")
    def sessions_command(self) -> str:
        """Affinity keys: kind, bound account, idle upstream sockets, idle for."""
        idle = {key: (count, age) for key, count, age in self.service.sessions.snapshot()}
        rows = [("key", "kind", "account", "idle sockets", "idle for")]
        now = time.monotonic()
        for entry in self.service.state.bindings.items():
            count, age = idle.pop((entry.key, entry.binding.account_id), (0, now - entry.last_used))
            rows.append(
                (
                    entry.key,
                    entry.binding.kind.value,
                    entry.binding.account_id,
                    str(count),
                    f"{age:.0f}s",
                )
            )
        for (key, account), (count, age) in idle.items():
            rows.append((key or "-", "-", account or "(client)", str(count), f"{age:.0f}s"))
        return table(rows)

    # -- helpers -----------------------------------------------------------

    @staticmethod
    def _wants(flow: http.HTTPFlow) -> bool:
        return routing.is_bridged(flow.request.method, flow.request.path)

    @staticmethod
    def _answer(flow: http.HTTPFlow, error: openai_errors.HttpError) -> None:
        headers = http.Headers([(k.encode(), v.encode()) for k, v in error.headers])
        flow.response = http.Response.make(error.status, error.body, headers)

    @staticmethod
    def _restore(flow: http.HTTPFlow, routed: _Routed) -> None:
        destination = routed.turn.destination
        flow.request.data.scheme = destination.scheme.encode()
        flow.request.data.host = destination.host
        flow.request.data.port = destination.port
        flow.request.headers.pop(TOKEN_HEADER, None)

    @staticmethod
    def _annotate(flow: http.HTTPFlow, routed: _Routed) -> None:
        report = routed.turn.report
        meta: dict[str, Any] = flow.metadata.setdefault(METADATA_KEY, {"role": "client"})
        meta.update(
            account=report.account,
            outcome=report.outcome,
            attempts=[a.as_dict() for a in report.attempts],
            upstream_flows=[a.upstream_flow for a in report.attempts if a.upstream_flow],
        )
        flow.comment = report.describe()


def _client_credential(headers: http.Headers) -> UpstreamCredential | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return UpstreamCredential(token.strip(), headers.get("chatgpt-account-id") or None)
