"""The mitmproxy addon: picks out Responses requests and routes them to the bridge.

A bridged flow is answered by the loopback endpoint (see `loopback`): the
`request` hook parses and checks the request, registers the turn under a
one-time token and points the flow at 127.0.0.1; `responseheaders` puts the
flow's original destination back (so mitmweb shows the URL the client used)
and streams the answer; `response` keeps the streamed SSE body for display.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from addon import openai_errors, routing
from addon.bridge_service import BridgeService, BridgeSettings, Destination, Turn
from addon.create_request import BadRequest, parse_create_request
from addon.handshake_headers import UpstreamCredential, client_request_id
from addon.loopback import TOKEN_HEADER, LoopbackServer
from addon.upstream_client import UpstreamSettings

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
METADATA_KEY = "responses_bridge"


@dataclass
class _Routed:
    """A flow currently detoured through the loopback endpoint."""

    token: str
    destination: Destination
    body: bytearray = field(default_factory=bytearray)


class _Tap:
    """Keeps a copy of the streamed body so mitmweb can show it afterwards."""

    def __init__(self, buffer: bytearray) -> None:
        self._buffer = buffer

    def __call__(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        return chunk


class ResponsesBridge:
    def __init__(self) -> None:
        self.loopback = LoopbackServer()
        self.service = BridgeService(BridgeSettings())
        self._routed: dict[str, _Routed] = {}
        self.max_body = 32 * MiB

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
            "bridge_connect_timeout",
            str,
            "10",
            "Seconds to open an upstream WebSocket (TCP, TLS and handshake).",
        )
        loader.add_option(
            "bridge_max_message_size",
            int,
            32 * MiB,
            "Largest upstream WebSocket message accepted, in bytes (0: no limit).",
        )
        loader.add_option(
            "bridge_ping_interval",
            str,
            "20",
            "Seconds between WebSocket pings to the upstream (0: no pings).",
        )
        loader.add_option(
            "bridge_ping_timeout",
            str,
            "20",
            "Seconds to wait for a pong before the upstream counts as lost (0: wait forever).",
        )
        loader.add_option(
            "bridge_compression",
            bool,
            False,
            "Offer permessage-deflate to the upstream.",
        )
        loader.add_option(
            "bridge_max_body",
            int,
            32 * MiB,
            "Largest Responses request body the bridge accepts, in bytes (larger: 413).",
        )
        loader.add_option(
            "bridge_sse_keepalive",
            str,
            "15",
            "Seconds of upstream silence after which an SSE comment is sent (0: never).",
        )

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith("bridge_") for name in updated):
            return
        opts = ctx.options
        if opts.bridge_upstream:
            try:
                routing.validate_upstream_option(opts.bridge_upstream)
            except ValueError as exc:
                raise exceptions.OptionsError(f"bridge_upstream: {exc}") from exc
        connect_timeout = _seconds(opts, "bridge_connect_timeout")
        ping_interval = _seconds(opts, "bridge_ping_interval")
        ping_timeout = _seconds(opts, "bridge_ping_timeout")
        keepalive = _seconds(opts, "bridge_sse_keepalive")
        if connect_timeout == 0:
            raise exceptions.OptionsError("bridge_connect_timeout must be positive")
        if opts.bridge_max_body <= 0:
            raise exceptions.OptionsError("bridge_max_body must be positive")
        if opts.bridge_max_message_size < 0:
            raise exceptions.OptionsError("bridge_max_message_size must not be negative")
        self.max_body = opts.bridge_max_body
        self.service.settings = BridgeSettings(
            upstream_option=opts.bridge_upstream,
            upstream=UpstreamSettings(
                connect_timeout=connect_timeout,
                max_message_size=opts.bridge_max_message_size or None,
                ping_interval=ping_interval or None,
                ping_timeout=ping_timeout or None,
                compression=opts.bridge_compression,
            ),
            sse_keepalive_s=keepalive or None,
        )

    # -- lifecycle -----------------------------------------------------------

    async def running(self) -> None:
        port = await self.loopback.start()
        logger.info("Responses bridge ready (loopback endpoint on 127.0.0.1:%d)", port)

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
            client_credential=_client_credential(flow.request.headers),
        )
        service = self.service
        token = self.loopback.register(lambda sink: service.serve(turn, sink))
        self._routed[flow.id] = _Routed(token, destination)
        # Detour to the loopback endpoint. `data.*` leaves the Host header as
        # the client sent it; the destination is restored in responseheaders.
        flow.request.data.scheme = b"http"
        flow.request.data.host = "127.0.0.1"
        flow.request.data.port = self.loopback.port
        flow.request.headers[TOKEN_HEADER] = token
        flow.metadata[METADATA_KEY] = {"role": "client", "request_id": request_id}

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
        self._annotate(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        routed = self._routed.pop(flow.id, None)
        if routed is not None:
            self.loopback.discard(routed.token)
            self._restore(flow, routed)
            self._annotate(flow)

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
        destination = routed.destination
        flow.request.data.scheme = destination.scheme.encode()
        flow.request.data.host = destination.host
        flow.request.data.port = destination.port
        flow.request.headers.pop(TOKEN_HEADER, None)

    def _annotate(self, flow: http.HTTPFlow) -> None:
        report = self.service.reports.pop(flow.id, None)
        meta = flow.metadata.setdefault(METADATA_KEY, {"role": "client"})
        if report is not None:
            meta.update(outcome=report.outcome, attempts=report.attempts)
            parts = [f"bridged: {report.outcome}"]
            parts += [_describe_attempt(i, a) for i, a in enumerate(report.attempts, 1)]
            flow.comment = "\n".join(parts)


def _seconds(opts: object, name: str) -> float:
    """Durations are string options: mitmproxy's --set parses no floats."""
    raw = getattr(opts, name)
    try:
        value = float(raw)
    except ValueError:
        raise exceptions.OptionsError(f"{name}: {raw!r} is not a number of seconds") from None
    if value < 0 or value != value or value == float("inf"):
        raise exceptions.OptionsError(f"{name}: must be a finite number of seconds >= 0")
    return value


def _describe_attempt(number: int, attempt: dict[str, object]) -> str:
    details = ", ".join(f"{k}={v}" for k, v in attempt.items() if k not in {"url"})
    return f"attempt {number}: {details}"


def _client_credential(headers: http.Headers) -> UpstreamCredential | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return UpstreamCredential(token.strip(), headers.get("chatgpt-account-id") or None)
