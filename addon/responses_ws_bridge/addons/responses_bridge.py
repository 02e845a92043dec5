"""The bridge's mitmproxy hooks: picks out Responses requests and routes them to the service.

`requestheaders` answers what the headers alone refuse and takes the body as it
streams in; the `request` hook parses and checks the request, starts the turn
and waits for its first answer, which it sets as `flow.response`; the rest of
the answer streams through mitmproxy's own connection (`addons.flow_streaming`).
`response` writes the turn's report into the flow's metadata and comment (the
streamed SSE body is kept, as mitmproxy keeps any streamed body, with
`store_streamed_bodies`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mitmproxy import command, connection, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.mode_specs import ReverseMode

from responses_ws_bridge.addons import flow_streaming, ws_streaming
from responses_ws_bridge.addons.option_values import (
    MiB,
    not_negative,
    one_line_at_startup,
    positive,
    seconds,
    table,
)
from responses_ws_bridge.core import (
    openai_errors,
    request_checks,
    request_log,
    routing,
    upstream_trust,
)
from responses_ws_bridge.core.accounts import client_key_ok
from responses_ws_bridge.core.affinity import NO_AFFINITY, Affinity, AffinityKind, classify
from responses_ws_bridge.core.body_decoding import BodyDecodingError, StreamDecoder
from responses_ws_bridge.core.create_request import (
    DEFAULT_FRAME_LIMIT,
    BadRequest,
    CreateRequest,
    decision_fields_of,
    parse_create_request,
)
from responses_ws_bridge.core.handshake_headers import UpstreamCredential, client_request_id
from responses_ws_bridge.core.http_fields import bearer_token
from responses_ws_bridge.core.pool_routes import Route, RouteKind, route
from responses_ws_bridge.core.retry_policy import DEFAULT_RETRY_BUDGET
from responses_ws_bridge.core.turns import (
    CLIENT_GONE,
    ERROR,
    PENDING,
    Destination,
    ForwardedHttp,
    Turn,
)
from responses_ws_bridge.core.ws_client_engine import WsClientRequest
from responses_ws_bridge.recording.session_flows import make_response
from responses_ws_bridge.shell.bridge_service import (
    DEFAULT_FIRST_EVENT_TIMEOUT_S,
    DEFAULT_HOLD_CREATED_S,
    DEFAULT_SSE_KEEPALIVE_S,
    DEFAULT_STREAM_IDLE_TIMEOUT_S,
    BridgeService,
)
from responses_ws_bridge.shell.request_body import BodyCollector
from responses_ws_bridge.shell.session_pool import DEFAULT_IDLE_TTL_S, DEFAULT_MAX_AGE_S
from responses_ws_bridge.shell.sink import ClientGone, ClientSink
from responses_ws_bridge.shell.turn_metrics import TurnMetrics, observe
from responses_ws_bridge.shell.ws_client_run import serve_websocket

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
    "bridge_session_max_age",
    "bridge_trusted_upstreams",
    "bridge_stream_idle_timeout",
    "bridge_first_event_timeout",
    "bridge_hold_created",
    "bridge_upstream_frame_limit",
)
LAZY_NOTE = (
    "bridge: reverse mode, connection_strategy set to lazy (mitmproxy must not connect to "
    "the target before the bridge has taken the request)"
)


@dataclass
class _Routed:
    """A bridged flow whose answer is on its way."""

    turn: Turn
    # The task serving the turn, and where it writes the answer.
    task: asyncio.Future[None]
    sink: flow_streaming.FlowSink
    # When the turn started and when its first answer bytes were ready (monotonic).
    started: float
    first: float | None = None
    streamed: bool = False

    def answered(self, status: int | None, now: float) -> request_log.Answered:
        first = self.first - self.started if self.first is not None else None
        return request_log.Answered(
            status, self.turn.report.code, self.streamed, first, now - self.started
        )


class ResponsesBridge:
    def __init__(self, service: BridgeService) -> None:
        self.service = service
        self.max_body = DEFAULT_MAX_BODY
        self.max_frame = DEFAULT_FRAME_LIMIT
        self._routed: dict[str, _Routed] = {}
        # Client WebSockets the pool serves, by flow id, and their turns so far.
        self._sockets: dict[str, tuple[ws_streaming.ClientSocket, list[Turn]]] = {}
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
        loader.add_option(
            "bridge_session_max_age",
            str,
            f"{DEFAULT_MAX_AGE_S:g}",
            "Seconds after which an idle upstream WebSocket is retired instead of reused "
            "(the upstream ends sockets after 60 minutes; 0: no limit).",
        )
        loader.add_option(
            upstream_trust.TRUSTED_UPSTREAMS_OPTION,
            str,
            ",".join(upstream_trust.DEFAULT_TRUSTED_UPSTREAMS),
            "With an account pool, the hosts a request's own destination may be (comma-"
            "separated, *.domain for its subdomains, https only); other destinations get 403.",
        )
        loader.add_option(
            "bridge_stream_idle_timeout",
            str,
            f"{DEFAULT_STREAM_IDLE_TIMEOUT_S:g}",
            "Seconds without any upstream event after which a turn is given up "
            "(a retry before the first event, response.failed after it; 0: never).",
        )
        loader.add_option(
            "bridge_first_event_timeout",
            str,
            f"{DEFAULT_FIRST_EVENT_TIMEOUT_S:g}",
            "Seconds from a request's arrival within which its first upstream event must come, "
            "over every retry (then 504 upstream_timeout; 0: only the idle timeout).",
        )
        loader.add_option(
            "bridge_upstream_frame_limit",
            int,
            DEFAULT_FRAME_LIMIT,
            "Largest response.create message the upstream takes, in bytes; a larger request "
            "is answered 400 payload_too_large before any upstream contact (0: no limit).",
        )
        loader.add_option(
            "bridge_hold_created",
            str,
            f"{DEFAULT_HOLD_CREATED_S:g}",
            "Seconds response.created / response.in_progress are held back for the first "
            "output event, so that an overload or auth error after them is still a retry "
            "(0: sent at once).",
        )

    @one_line_at_startup
    def configure(self, updated: set[str]) -> None:
        # Answers stream from inside mitmproxy or not at all: refuse a mitmproxy that cannot.
        flow_streaming.install()
        if updated & {"mode", "connection_strategy"}:
            self._lazy_in_reverse_mode()
        if not updated.intersection(OPTIONS):
            return
        opts = ctx.options
        if opts.bridge_upstream:
            try:
                routing.validate_upstream_option(opts.bridge_upstream)
            except ValueError as exc:
                raise exceptions.OptionsError(f"bridge_upstream: {exc}") from exc
        try:
            trusted = upstream_trust.parse_trusted_hosts(opts.bridge_trusted_upstreams)
        except ValueError as exc:
            raise exceptions.OptionsError(str(exc)) from exc
        settings = dataclasses.replace(
            self.service.settings,
            trusted_hosts=trusted,
            stream_idle_timeout_s=seconds(opts, "bridge_stream_idle_timeout") or None,
            first_event_timeout_s=seconds(opts, "bridge_first_event_timeout") or None,
            hold_created_s=seconds(opts, "bridge_hold_created") or None,
            upstream_option=opts.bridge_upstream,
            sse_keepalive_s=seconds(opts, "bridge_sse_keepalive") or None,
            retry_budget=not_negative(opts, "bridge_retry_budget"),
            session_idle_ttl_s=seconds(opts, "bridge_session_idle_ttl"),
            session_max_age_s=seconds(opts, "bridge_session_max_age"),
        )
        self.max_body = positive(opts, "bridge_max_body")
        self.max_frame = not_negative(opts, "bridge_upstream_frame_limit")
        self.service.apply_settings(settings)

    @staticmethod
    def _lazy_in_reverse_mode() -> None:
        """In reverse mode mitmproxy's default (eager) strategy connects to the target
        first and drops the client when that fails, before any hook could answer."""
        opts = ctx.options
        modes = getattr(opts, "mode", [])
        if opts.connection_strategy != "lazy" and any(m.startswith("reverse:") for m in modes):
            opts.connection_strategy = "lazy"
            logger.info(LAZY_NOTE)

    # -- lifecycle -----------------------------------------------------------

    def running(self) -> None:
        logger.info("%s (answers streamed from inside mitmproxy)", READY_LINE)

    async def done(self) -> None:
        await self.service.shutdown()

    def client_disconnected(self, client: connection.Client) -> None:
        flow_streaming.close_left_open(client)

    # -- hooks -----------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Answers what the headers alone refuse, and takes the body as it streams in.

        A wrong client key, headers the upstream handshake cannot carry, or an
        announced body over `bridge_max_body` are answered before any of the body
        is read (no `100 Continue`), and the connection closes. Otherwise the
        body is decoded and capped chunk by chunk (`BodyCollector`): a gzip bomb
        stops at the cap of decoded bytes.
        """
        served = self._route(flow)
        if served is None:
            return
        headers = list(flow.request.headers.items(multi=True))
        early = request_checks.early_answer(
            headers, client_key_ok=self._client_key_ok(flow), max_body=self.max_body
        )
        if early is not None:
            flow.request.headers.pop("expect", None)
            self._answer(flow, early.error)
            if early.close:
                flow_streaming.consume_body(flow, None)
            return
        if request_checks.body_may_follow(headers):
            collector = BodyCollector(
                flow.request.headers.get("content-encoding"),
                limit=self.max_body,
                # A forwarded request goes upstream as it came.
                keep_wire=served.kind is not RouteKind.BRIDGED,
            )
            flow_streaming.consume_body(flow, collector)

    async def request(self, flow: http.HTTPFlow) -> None:
        served = self._route(flow)
        if served is None or flow.response is not None:
            return
        if served.kind is RouteKind.WEBSOCKET and self._client_key_ok(flow):
            await self._websocket(flow)
            return
        turn = self._turn_for(flow, served)
        if turn is None:
            return
        flow.metadata[METADATA_KEY] = {
            "role": "client",
            "request_id": turn.request_id,
            "affinity": turn.affinity.kind.value,
            "key": turn.affinity.key,
        }
        await self._stream(flow, turn)

    def _turn_for(self, flow: http.HTTPFlow, served: Route) -> Turn | None:
        """The checked request as a turn, or None when it was answered with an error."""
        if not flow_streaming.installed():
            self._answer(flow, openai_errors.bridge_not_ready())
            return None
        if not self._client_key_ok(flow):
            self._answer(flow, openai_errors.unauthorized_client_key())
            return None
        wire = _wire_body(flow)
        body = self._body(flow)
        if isinstance(body, openai_errors.HttpError):
            self._answer(flow, body)
            return None
        forwarded: ForwardedHttp | None = None
        if served.kind is RouteKind.BRIDGED:
            try:
                create = parse_create_request(
                    body, max_body=self.max_body, max_frame=self.max_frame
                )
            except BadRequest as exc:
                self._answer(flow, openai_errors.bad_request(exc))
                return None
        else:
            create = CreateRequest(stream=False, message=b"", body=decision_fields_of(body))
            forwarded = ForwardedHttp(served, flow.request.method, wire)
        return self._turn(flow, served, create, forwarded)

    def _turn(
        self,
        flow: http.HTTPFlow,
        served: Route,
        create: CreateRequest,
        forwarded: ForwardedHttp | None,
    ) -> Turn:
        state = self.service.state
        headers = tuple(flow.request.headers.items(multi=True))
        request_id = client_request_id(headers) or f"req_{uuid.uuid4().hex}"
        destination = Destination(
            flow.request.scheme, flow.request.host, flow.request.port, flow.request.path
        )
        return Turn(
            flow_id=flow.id,
            create=create,
            client_headers=headers,
            request_id=request_id,
            destination=destination,
            affinity=_affinity(served, headers, create),
            client_credential=(None if state.pooled else _client_credential(flow.request.headers)),
            reverse_target=_reverse_target(flow),
            own_endpoints=self._own_endpoints(flow),
            http=forwarded,
        )

    async def _websocket(self, flow: http.HTTPFlow) -> None:
        """Serves a client's WebSocket upgrade through the pool (`ws_client_engine`).

        The upgrade is answered once the engine says how: a 101 (the client's
        socket is then held by `ws_streaming.PoolWebsocketLayer`), or the HTTP
        error a bridged request would get.
        """
        if not flow_streaming.installed():
            self._answer(flow, openai_errors.bridge_not_ready())
            return
        headers = tuple(flow.request.headers.items(multi=True))
        request = WsClientRequest(
            flow_id=flow.id,
            headers=headers,
            destination=Destination(
                flow.request.scheme, flow.request.host, flow.request.port, flow.request.path
            ),
            request_id=client_request_id(headers) or f"req_{uuid.uuid4().hex}",
            reverse_target=_reverse_target(flow),
            own_endpoints=self._own_endpoints(flow),
        )
        client = ws_streaming.ClientSocket(flow)
        turns: list[Turn] = []
        self._sockets[flow.id] = (client, turns)
        flow_streaming.serve_websocket(
            flow, lambda context, f: ws_streaming.PoolWebsocketLayer(context, f, client)
        )
        flow.metadata[METADATA_KEY] = {"role": "client", "request_id": request.request_id}
        task = asyncio.ensure_future(self._serve_socket(flow, request, client, turns))
        waiting: list[asyncio.Future[Any]] = [client.head, task]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not client.head.done():
            self._answer(flow, openai_errors.bridge_internal_error())
            return
        head = client.head.result()
        if head.status != 101:
            self._answer(flow, openai_errors.HttpError(head.status, head.body, head.headers))
            return
        key = flow.request.headers.get("sec-websocket-key", "")
        fields = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", ws_streaming.accept_key(key)),
            *head.headers,
        ]
        response = make_response(
            101, b"", http.Headers([(k.encode(), v.encode()) for k, v in fields])
        )
        response.headers.pop("content-length", None)
        flow.response = response

    async def _serve_socket(
        self,
        flow: http.HTTPFlow,
        request: WsClientRequest,
        client: ws_streaming.ClientSocket,
        turns: list[Turn],
    ) -> None:
        try:
            await serve_websocket(self.service, request, client, turns)
        except ClientGone:
            pass
        except Exception:
            # A bug must not take the proxy down: end this client's socket, serve the rest.
            logger.exception("bridge WebSocket client %s failed", request.request_id)
            if not client.head.done():
                error = openai_errors.bridge_internal_error()
                client.refuse(error.status, error.headers, error.body)
            with contextlib.suppress(ClientGone):
                await client.close(1011, "the bridge failed to serve this session")
        finally:
            self._sockets.pop(flow.id, None)
            _annotate_socket(flow, turns)
            took = time.time() - flow.request.timestamp_start
            reports = [turn.report for turn in turns]
            line = request_log.socket_line(flow.request.method, flow.request.path, reports, took)
            logger.info("%s", line)

    def _own_endpoints(self, flow: http.HTTPFlow) -> tuple[upstream_trust.Endpoint, ...]:
        """The proxy's listen addresses and the address this client reached."""
        addresses: list[tuple[str, int]] = []
        proxyserver = ctx.master.addons.get("proxyserver") if ctx.master is not None else None
        if proxyserver is not None:
            addresses += [(str(a[0]), int(a[1])) for a in proxyserver.listen_addrs()]
        sockname = flow.client_conn.sockname
        if sockname:
            addresses.append((str(sockname[0]), int(sockname[1])))
        return tuple(dict.fromkeys(upstream_trust.Endpoint(h, p) for h, p in addresses))

    def _client_key_ok(self, flow: http.HTTPFlow) -> bool:
        accounts = self.service.state.config
        return accounts is None or client_key_ok(
            accounts, flow.request.headers.get("authorization")
        )

    def _body(self, flow: http.HTTPFlow) -> bytes | openai_errors.HttpError:
        """The request body, decoded, or the answer for one the bridge will not take."""
        collector = flow.request.stream
        if isinstance(collector, BodyCollector):
            if collector.refused is not None:
                return collector.refused
            if not collector.result.done():
                return openai_errors.request_too_large(None, self.max_body)
            body = collector.result.result()
            # Kept decoded, for mitmweb and `-w`: the wire bytes were never held.
            flow.request.headers.pop("content-encoding", None)
            flow.request.data.content = body
            flow.request.stream = False
            return body
        if flow.request.raw_content is None:
            # Streamed by mitmproxy itself (stream_large_bodies): too large for us.
            return openai_errors.request_too_large(None, self.max_body)
        # The headers were checked in `requestheaders`; the body is capped as it decodes.
        try:
            decoder = StreamDecoder.for_header(
                flow.request.headers.get("content-encoding"), limit=self.max_body
            )
            return decoder.feed(flow.request.raw_content) + decoder.finish()
        except BodyDecodingError as exc:
            return openai_errors.body_decoding_failed(exc)

    async def _stream(self, flow: http.HTTPFlow, turn: Turn) -> None:
        """Serves the turn and answers the flow from inside mitmproxy, streaming when it can."""
        sink = flow_streaming.FlowSink(flow)
        started = time.monotonic()
        task = asyncio.ensure_future(self._serve(turn, sink))
        routed = self._routed[flow.id] = _Routed(turn, task=task, sink=sink, started=started)

        def first_answer(_: object) -> None:
            routed.first = time.monotonic()

        sink.head.add_done_callback(first_answer)
        # The status is known once the first upstream event (or the failure) is.
        waiting: list[asyncio.Future[Any]] = [sink.head, task]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not sink.head.done():
            self._answer(flow, openai_errors.bridge_internal_error())
            return
        head = sink.head.result()
        headers = http.Headers([(k.encode(), v.encode()) for k, v in head.headers])
        if head.body is not None:
            # Bytes as they are: a forwarded answer may be content-encoded already.
            response = make_response(head.status, b"", headers)
            response.raw_content = head.body
            response.headers["content-length"] = str(len(head.body))
            flow.response = response
            return
        # No length: mitmproxy frames it (chunked, or h2 DATA frames).
        headers["transfer-encoding"] = "chunked"
        flow.response = make_response(head.status, b"", headers)
        routed.streamed = True

    async def _serve(self, turn: Turn, sink: flow_streaming.FlowSink) -> None:
        serve = self.service.forward if turn.http is not None else self._serving()
        try:
            await serve(turn, sink)
        except ClientGone:
            pass
        except Exception:
            # A bug in a turn must not take the proxy down: answer what can still be answered.
            logger.exception("bridge turn %s failed", turn.request_id)
            error = openai_errors.bridge_internal_error()
            report = turn.report
            report.outcome, report.status = ERROR, error.status
            report.code = openai_errors.code_in(error.body)
            with contextlib.suppress(ClientGone):
                if not sink.started:
                    await sink.respond(error.status, list(error.headers), error.body)
                else:
                    await sink.abort("the bridge failed to serve this request")

    def _serving(self) -> Callable[[Turn, ClientSink], Awaitable[None]]:
        """The service's `serve`, counted in the metrics when they are on."""
        service, metrics = self.service, self.metrics()
        if metrics is None:
            return service.serve
        counted: TurnMetrics = metrics
        return lambda turn, sink: observe(service.serve, turn, sink, counted)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        routed = self._routed.get(flow.id)
        if routed is None or flow.response is None:
            return
        if routed.streamed:
            # As for any streamed response, mitmproxy keeps the body (for mitmweb, `-w`)
            # only with `store_streamed_bodies`; the session flow has every event anyway.
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        routed = self._routed.pop(flow.id, None)
        if routed is None or flow.response is None:
            self._log_answered(flow)
            return
        self._annotate(flow, routed)
        self._log_turn(flow, routed)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        served = self._sockets.get(flow.id)
        if served is not None:
            # Before mitmproxy's save addon writes the flow.
            _annotate_socket(flow, served[1])

    def error(self, flow: http.HTTPFlow) -> None:
        served = self._sockets.get(flow.id)
        if served is not None:
            # The client left before (or while) its 101 went out.
            flow_streaming.forget(flow)
            served[0].ended(None, "")
        routed = self._routed.pop(flow.id, None)
        if routed is None:
            self._log_answered(flow)
            return
        flow_streaming.forget(flow)
        # The client left: end the upstream turn promptly. That is the turn's outcome
        # unless it had already ended (the report is read now, for the flow and `-w`).
        routed.task.cancel()
        if routed.turn.report.outcome == PENDING:
            routed.turn.report.outcome = CLIENT_GONE
        self._annotate(flow, routed)
        self._log_turn(flow, routed)

    # -- the request's log line ----------------------------------------------------

    def _log_turn(self, flow: http.HTTPFlow, routed: _Routed) -> None:
        status = flow.response.status_code if flow.response is not None else None
        answered = routed.answered(status, time.monotonic())
        line = request_log.request_line(
            flow.request.method, flow.request.path, answered, routed.turn.report
        )
        logger.info("%s", line)

    def answers(self, flow: http.HTTPFlow) -> bool:
        """Whether the bridge answers this flow itself (and logs its line)."""
        return self._route(flow) is not None

    def _log_answered(self, flow: http.HTTPFlow) -> None:
        """A request the bridge answered without a turn (refused by its checks)."""
        served = self._route(flow)
        if served is None or flow.response is None:
            return
        if flow.id in self._sockets:
            return  # a client's WebSocket: its line comes when the socket ends
        response = flow.response
        total = (response.timestamp_end or time.time()) - flow.request.timestamp_start
        answered = request_log.Answered(
            response.status_code, openai_errors.code_in(response.content), total_s=total
        )
        line = request_log.request_line(flow.request.method, flow.request.path, answered, None)
        logger.info("%s", line)

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

    def _route(self, flow: http.HTTPFlow) -> Route | None:
        """What the bridge does with the flow: its route, or None when it passes untouched.

        Without a pool only `POST …/responses` is the bridge's; with one, every
        request is (the pool is the client's whole base URL).
        """
        if flow.metadata.get(METADATA_KEY, {}).get("role") == "upstream":
            return None  # the bridge's own recorded upstream session, shown through the hooks
        request = flow.request
        upgrade = "websocket" in request.headers.get("upgrade", "").lower()
        served = route(request.method, request.path, websocket=upgrade)
        if served.kind is RouteKind.BRIDGED or self.service.state.pooled:
            return served
        return None

    @staticmethod
    def _answer(flow: http.HTTPFlow, error: openai_errors.HttpError) -> None:
        headers = http.Headers([(k.encode(), v.encode()) for k, v in error.headers])
        flow.response = make_response(error.status, error.body, headers)

    @staticmethod
    def _annotate(flow: http.HTTPFlow, routed: _Routed) -> None:
        report = routed.turn.report
        meta: dict[str, Any] = flow.metadata.setdefault(METADATA_KEY, {"role": "client"})
        meta.update(
            account=report.account,
            outcome=report.outcome,
            attempts=[a.as_dict() for a in report.attempts],
            upstream_flows=[a.upstream_flow for a in report.attempts if a.upstream_flow],
            # How far a slow client held the answer up: the most bytes waiting in mitmproxy
            # for it after a write, and how many writes had to wait (FlowSink).
            unsent_peak=routed.sink.unsent_peak,
            held_up_writes=routed.sink.held_up_writes,
        )
        flow.comment = report.describe()


def _annotate_socket(flow: http.HTTPFlow, turns: list[Turn]) -> None:
    """A served WebSocket's flow: the account and every turn, as a bridged flow's report."""
    meta: dict[str, Any] = flow.metadata.setdefault(METADATA_KEY, {"role": "client"})
    reports = [turn.report for turn in turns]
    meta.update(
        account=next((r.account for r in reversed(reports) if r.account), None),
        turns=[
            {
                "affinity": r.affinity.kind.value,
                "key": r.affinity.key,
                "outcome": r.outcome,
                "attempts": [a.as_dict() for a in r.attempts],
            }
            for r in reports
        ],
        upstream_flows=list(
            dict.fromkeys(a.upstream_flow for r in reports for a in r.attempts if a.upstream_flow)
        ),
    )
    flow.comment = "\n".join(r.describe() for r in reports if r.attempts or r.outcome != "pending")


def _wire_body(flow: http.HTTPFlow) -> bytes:
    """The request body as the client sent it (before `_body` keeps it decoded)."""
    collector = flow.request.stream
    if isinstance(collector, BodyCollector):
        return collector.wire
    return flow.request.raw_content or b""


def _affinity(
    served: Route, headers: tuple[tuple[str, str], ...], create: CreateRequest
) -> Affinity:
    """Whose account serves the request: `affinity.classify` of what it carries, except
    that one response belongs to whoever produced it, and models to anyone."""
    if served.kind is RouteKind.ONE_RESPONSE:
        return Affinity(AffinityKind.SOFT, source="path:response_id", owner_hint=served.response_id)
    if served.kind is RouteKind.MODELS:
        return NO_AFFINITY
    return classify(headers, create.body)


def _reverse_target(flow: http.HTTPFlow) -> upstream_trust.Endpoint | None:
    mode = flow.client_conn.proxy_mode
    if isinstance(mode, ReverseMode):
        return upstream_trust.Endpoint(mode.address[0], mode.address[1])
    return None


def _client_credential(headers: http.Headers) -> UpstreamCredential | None:
    token = bearer_token(headers.get("authorization"))
    if token is None:
        return None
    return UpstreamCredential(token, headers.get("chatgpt-account-id") or None)
