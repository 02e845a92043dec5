"""A local Responses WebSocket server: the fake upstream of `make run`, tests and benchmarks.

It speaks the protocol the way the real server does (upgrade on any path ending
in `/responses`, one `response.create` per turn, JSON text frames back, `error`
events for bad messages, `previous_response_id` scoped to the account that
produced it), can be scripted per connection with `Plan`s (reject the handshake,
close or drop mid-turn, answer with an error, hang, pace the events), and logs
every connection as a `ConnectionRecord`. A request may pick its own workload
(delta count, pace, send-time stamps) through its `metadata`: see
`response_events.requested_workload`.

`LocalUpstream` runs in the caller's event loop; `ThreadedUpstream` runs one in
its own thread for synchronous tests. `python -m responses_ws_bridge.local.upstream` serves
one until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import http
import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State

from responses_ws_bridge.local import http_endpoints
from responses_ws_bridge.local.http_endpoints import MODELS_BODY, Objects, Stored
from responses_ws_bridge.local.http_side import HttpAnswer, HttpRequest, sniffing
from responses_ws_bridge.local.loop_thread import (
    LoopThread,
    WebSocketServerContext,
    serve_until_stopped,
)
from responses_ws_bridge.local.response_events import (
    BadWorkload,
    TurnSpec,
    apply_workload,
    encode,
    error_event,
    function_call_for,
    http_error_body,
    requested_workload,
    turn_events,
)
from responses_ws_bridge.local.tls import add_tls_arguments, tls_context_from

ClosedBy = Literal["client", "server", "abrupt"]

__all__ = ["MODELS_BODY", "ConnectionRecord", "HttpPlan", "LocalUpstream", "Plan"]


@dataclass(frozen=True)
class Plan:
    """How the server treats one connection.

    `reject_status`: answer the handshake with this HTTP status (and
    `reject_body`, default an OpenAI-style error, plus `reject_headers`).
    On the first `response.create` only: `close_code` closes after
    `close_after_events` events of the turn (0: before `response.created`);
    `drop_after_events` aborts the TCP connection after that many events,
    without a close frame; `error` (a whole `error` event, or any other
    terminal event such as a `response.failed`) is sent instead of the turn
    (`error_turn`: on that `response.create` instead of the first), or after
    the turn's first `error_after_events` events (the socket stays open).
    `stall_after_events` stops the connection dead after that many events: no
    more frames, nothing read (pings unanswered), no close. `hang` answers no
    `response.create` at all. Otherwise turns follow `turn`, `pace_s` apart (0:
    back to back), each preceded by the `rate_limits` frame when given.
    `turn_state` goes out as `x-codex-turn-state` on the 101, `headers` on the
    101 as they are. `extra_events` are `(n, event)` pairs: `event` goes out
    after the turn's first `n` events (vendor events, metadata). `delay_s`
    holds the first turn's events back that long (a long upstream queue).
    """

    reject_status: int | None = None
    reject_body: Mapping[str, Any] | None = None
    reject_headers: Mapping[str, str] = field(default_factory=dict)
    close_code: int | None = None
    close_reason: str | None = None
    close_after_events: int = 0
    drop_after_events: int | None = None
    error: Mapping[str, Any] | None = None
    turn: TurnSpec = field(default_factory=TurnSpec)
    pace_s: float = 0.0
    turn_state: str | None = None
    hang: bool = False
    error_turn: int = 1
    stall_after_events: int | None = None
    rate_limits: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    error_after_events: int = 0
    extra_events: tuple[tuple[int, Mapping[str, Any]], ...] = ()
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        failures = [
            self.close_code is not None,
            self.drop_after_events is not None,
            self.error is not None,
            self.hang,
            self.stall_after_events is not None,
        ]
        if sum(failures) > 1:
            raise ValueError(
                "a Plan takes at most one of close_code, drop_after_events, error, hang, "
                "stall_after_events"
            )
        if self.close_after_events < 0 or (self.drop_after_events or 0) < 0:
            raise ValueError("event counts must be >= 0")
        if self.pace_s < 0 or self.delay_s < 0:
            raise ValueError("pace_s and delay_s must be >= 0")

    @property
    def reason(self) -> str:
        """The close reason sent with `close_code`."""
        if self.close_reason is not None:
            return self.close_reason
        return "internal error" if self.close_code == 1011 else ""


@dataclass(frozen=True)
class HttpPlan:
    """How the server treats one plain HTTP request (compaction, models, one response, …).

    `status`: answer with it (and `body`, default an OpenAI-style error)
    instead of the endpoint's answer; None: answer as the endpoint does.
    `headers` go on the answer either way (e.g. `x-codex-*` rate limits).
    """

    status: int | None = None
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientMessage:
    """One frame from the client: `data` is the parsed JSON, else the raw text."""

    received_at: float
    data: Any
    raw: str


@dataclass(frozen=True)
class SentEvent:
    sent_at: float
    event: Mapping[str, Any]


@dataclass(frozen=True)
class ConnectionRecord:
    """What happened on one connection (a snapshot; see `LocalUpstream.records`).

    `status` is the HTTP status of the handshake answer (101 when accepted; None
    while unanswered). `closed_by` is None while the connection is open;
    "abrupt" means the TCP connection ended without a close frame, recorded
    with `close_code` 1006.
    """

    id: int
    path: str
    headers: list[tuple[str, str]]
    account: str | None
    opened_at: float
    status: int | None = None
    plan: Plan | None = None
    messages: list[ClientMessage] = field(default_factory=list)
    events: list[SentEvent] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    closed_by: ClosedBy | None = None
    closed_at: float | None = None
    # A plain HTTP request (not an upgrade): its method and body as received.
    method: str = "GET"
    body: bytes = field(default=b"", repr=False)

    @property
    def rejected(self) -> bool:
        return self.status is not None and self.status != 101

    @property
    def ended(self) -> bool:
        return self.closed_by is not None

    @property
    def event_types(self) -> list[str]:
        return [str(sent.event.get("type")) for sent in self.events]

    @property
    def response_ids(self) -> list[str]:
        """Ids of the responses this connection completed, in order."""
        return [
            str(sent.event["response"]["id"])
            for sent in self.events
            if sent.event.get("type") == "response.completed"
        ]

    def header(self, name: str) -> str | None:
        """The first value of a handshake header, whatever its case."""
        name = name.lower()
        return next((value for key, value in self.headers if key.lower() == name), None)

    def header_names(self) -> list[str]:
        return [key for key, _ in self.headers]


# -- pure decisions ---------------------------------------------------------


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def is_websocket_upgrade(headers: Headers) -> bool:
    upgrade = ",".join(headers.get_all("Upgrade")).lower()
    return "websocket" in [token.strip() for token in upgrade.split(",")]


def check_message(raw: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(`response.create` body, None) for a valid message, else (None, `error` event)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None, error_event(
            400, "invalid_request_error", "Invalid JSON in WebSocket message.", param=None
        )
    if not isinstance(data, dict):
        return None, error_event(
            400, "invalid_request_error", "WebSocket messages must be JSON objects."
        )
    kind = data.get("type")
    if kind != "response.create":
        return None, error_event(
            400,
            "unknown_event_type",
            f"Unsupported event type {kind!r}; expected 'response.create'.",
            param="type",
        )
    if not data.get("model"):
        return None, error_event(
            400, "missing_required_parameter", "Missing required parameter: 'model'.", param="model"
        )
    return data, None


def previous_response_error(
    request: Mapping[str, Any], owners: Mapping[str, str | None], account: str | None
) -> dict[str, Any] | None:
    """The `error` event for a `previous_response_id` this account did not produce."""
    previous = request.get("previous_response_id")
    if previous is None:
        return None
    if previous in owners and owners[previous] == account:
        return None
    return error_event(
        400,
        "previous_response_not_found",
        f"Previous response with id '{previous}' not found.",
        param="previous_response_id",
    )


def json_response(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> Response:
    """A plain HTTP answer to the handshake request, with a JSON body."""
    data = json.dumps(body).encode()
    fields = Headers()
    fields["Date"] = email.utils.formatdate(usegmt=True)
    fields["Content-Type"] = "application/json"
    fields["Content-Length"] = str(len(data))
    # One request per connection, as the websockets server handles it.
    fields["Connection"] = "close"
    for name, value in (headers or {}).items():
        fields[name] = value
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return Response(status, phrase, fields, data)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- the server -------------------------------------------------------------


@dataclass
class _Live:
    """A connection's record as the server writes it (mutated under the lock)."""

    record: ConnectionRecord
    plan: Plan
    messages: list[ClientMessage] = field(default_factory=list)
    events: list[SentEvent] = field(default_factory=list)
    creates: int = 0

    def snapshot(self) -> ConnectionRecord:
        # Fresh lists: a snapshot never changes, and changing it changes nothing here.
        return replace(
            self.record,
            headers=list(self.record.headers),
            messages=list(self.messages),
            events=list(self.events),
        )


class _Stop(Exception):
    """The turn cannot go on: the connection is closing or gone."""


class LocalUpstream(WebSocketServerContext):
    """A Responses WebSocket server on 127.0.0.1; `async with` starts and stops it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: Mapping[str, str] | None = None,
        default_plan: Plan | None = None,
        max_size: int | None = 64 * 1024 * 1024,
        compression: Literal["deflate"] | None = None,
        close_timeout: float = 2.0,
        observer: Callable[[ConnectionRecord], None] | None = None,
        record_events: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        # Set: the server speaks TLS (wss://), as real upstreams do.
        self.ssl_context = ssl_context
        self._requested_port = port
        self.tokens: dict[str, str] | None = dict(tokens) if tokens is not None else None
        self.default_plan = default_plan if default_plan is not None else Plan()
        self.max_size = max_size
        self.compression = compression
        self.close_timeout = close_timeout
        # Called in the server loop on every handshake answer and every end.
        self.observer = observer
        # Off for benchmarks: keeping every event of every connection costs
        # memory and time that would be measured as the upstream's.
        self.record_events = record_events
        self._server: Server | None = None
        self._port = 0
        self._lock = threading.Condition()
        self._plans: list[tuple[str | None, Plan]] = []
        self._connections: dict[int, _Live] = {}
        self._by_connection: dict[ServerConnection, _Live] = {}
        # Records with a lower id are hidden by `reset()`.
        self._first_shown = 1
        self._next_id = 1
        # Response id -> the account that produced it.
        self._owners: dict[str, str | None] = {}
        # What the plain HTTP endpoints read back: stored responses, files.
        self._objects = Objects(owners=self._owners)
        self._http_plans: list[tuple[str | None, HttpPlan]] = []
        self._changed: asyncio.Event | None = None

    # -- lifecycle

    async def start(self) -> None:
        self._changed = asyncio.Event()
        self._server = await serve(
            self._serve,
            self.host,
            self._requested_port,
            process_request=self._process_request,
            process_response=self._process_response,
            max_size=self.max_size,
            compression=self.compression,
            close_timeout=self.close_timeout,
            ssl=self.ssl_context,
            # Plain HTTP requests on the same port, as a real Responses host serves them.
            create_connection=sniffing(self._http_request),
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    @property
    def http_url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self._port}"

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{self.host}:{self._port}"

    # -- scripting and records (any thread)

    def script(self, *plans: Plan, account: str | None = None) -> None:
        """Queues plans: each new connection (of `account`, or any) takes the next one."""
        with self._lock:
            self._plans.extend((account, plan) for plan in plans)

    def script_http(self, *plans: HttpPlan, account: str | None = None) -> None:
        """Queues plans: each plain HTTP request (of `account`, or any) takes the next one."""
        with self._lock:
            self._http_plans.extend((account, plan) for plan in plans)

    def reset(self) -> None:
        """Forgets queued plans and hides the records so far (response ids stay valid)."""
        with self._lock:
            self._plans.clear()
            self._http_plans.clear()
            self._first_shown = self._next_id
            open_ones = {id(live) for live in self._by_connection.values()}
            self._connections = {
                conn_id: live
                for conn_id, live in self._connections.items()
                if id(live) in open_ones
            }

    def pending_plans(self) -> int:
        with self._lock:
            return len(self._plans)

    def records(self, account: str | None = None) -> list[ConnectionRecord]:
        """A snapshot of every connection so far, in order; only `account`'s when given."""
        with self._lock:
            return self._snapshot(account)

    def owner_of(self, response_id: str) -> str | None:
        """The account that produced a response id (None: anonymous or unknown)."""
        with self._lock:
            return self._owners.get(response_id)

    def wait_for(
        self, predicate: Callable[[list[ConnectionRecord]], bool], timeout: float
    ) -> list[ConnectionRecord]:
        """Blocks until `predicate(records)` holds; never call it from the server's loop."""
        found: list[list[ConnectionRecord]] = []

        def check() -> bool:
            records = self._snapshot(None)
            if predicate(records):
                found.append(records)
                return True
            return False

        with self._lock:
            if not self._lock.wait_for(check, timeout):
                raise TimeoutError(f"upstream records did not match within {timeout} s")
        return found[-1]

    async def wait_until(
        self, predicate: Callable[[list[ConnectionRecord]], bool], timeout: float
    ) -> list[ConnectionRecord]:
        """`wait_for` for code running in the server's own loop."""
        async with asyncio.timeout(timeout):
            while True:
                assert self._changed is not None, "not started"
                changed = self._changed
                records = self.records()
                if predicate(records):
                    return records
                await changed.wait()

    def _snapshot(self, account: str | None) -> list[ConnectionRecord]:
        records = [
            live.snapshot()
            for conn_id, live in sorted(self._connections.items())
            if conn_id >= self._first_shown
        ]
        if account is not None:
            records = [record for record in records if record.account == account]
        return records

    def _take_plan(self, account: str | None) -> Plan:
        for index, (wanted, plan) in enumerate(self._plans):
            if wanted is None or wanted == account:
                del self._plans[index]
                return plan
        return self.default_plan

    def _notify(self) -> None:
        """Wakes waiters in other threads (caller holds the lock) and in this loop."""
        self._lock.notify_all()
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _observe(self, live: _Live) -> None:
        if self.observer is not None:
            self.observer(live.snapshot())

    # -- handshake

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        headers = request.headers
        with self._lock:
            conn_id = self._next_id
            self._next_id += 1
            record = ConnectionRecord(
                id=conn_id,
                path=request.path,
                headers=list(headers.raw_items()),
                account=None,
                opened_at=time.time(),
            )
            live = _Live(record, self.default_plan)
            self._connections[conn_id] = live
            self._by_connection[connection] = live
            self._notify()

        upgrade = is_websocket_upgrade(headers)
        bridged = path.endswith("/responses")
        if not bridged:
            return json_response(
                404, http_error_body(404, f"Invalid URL ({request.method} {request.path})")
            )

        account: str | None = None
        if self.tokens is not None:
            token = bearer_token(headers.get("Authorization"))
            if token is None or token not in self.tokens:
                return json_response(
                    401,
                    http_error_body(401, "Incorrect API key provided."),
                    {"WWW-Authenticate": 'Bearer realm="OpenAI"'},
                )
            account = self.tokens[token]
        with self._lock:
            live.record = replace(live.record, account=account)

        if not upgrade:
            return json_response(
                426,
                http_error_body(426, "This endpoint expects a WebSocket upgrade."),
                {"Upgrade": "websocket"},
            )

        with self._lock:
            plan = self._take_plan(account)
            live.plan = plan
            live.record = replace(live.record, plan=plan)
        if plan.reject_status is not None:
            body = plan.reject_body
            if body is None:
                body = http_error_body(plan.reject_status)
            return json_response(plan.reject_status, body, plan.reject_headers)
        return None

    def _process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> Response | None:
        live = self._by_connection.get(connection)
        if live is None:
            return None
        if response.status_code == 101 and live.plan.turn_state is not None:
            response.headers["x-codex-turn-state"] = live.plan.turn_state
        if response.status_code == 101:
            for name, value in live.plan.headers.items():
                response.headers[name] = value
        with self._lock:
            live.record = replace(live.record, status=response.status_code)
            if response.status_code != 101:
                # No handler runs for a refused handshake: this is its end.
                live.record = replace(live.record, closed_by="server", closed_at=time.time())
                self._by_connection.pop(connection, None)
            self._notify()
        self._observe(live)
        return None

    # -- one connection

    async def _serve(self, ws: ServerConnection) -> None:
        live = self._by_connection[ws]
        closed = asyncio.ensure_future(ws.wait_closed())
        try:
            async for message in ws:
                raw = message if isinstance(message, str) else message.decode("utf-8", "replace")
                await self._on_message(ws, live, raw, closed)
        except (ConnectionClosed, _Stop):
            pass
        except Exception:
            # A bug in this server, not a scripted failure: end like a real
            # server would, and let websockets log the exception.
            await ws.close(1011, "local upstream error")
            raise
        finally:
            # The close handshake may still be running: wait for its outcome.
            await asyncio.shield(closed)
            self._record_end(ws, live)

    async def _on_message(
        self, ws: ServerConnection, live: _Live, raw: str, closed: asyncio.Future[None]
    ) -> None:
        try:
            data: Any = json.loads(raw)
        except ValueError:
            data = raw
        with self._lock:
            live.messages.append(ClientMessage(time.time(), data, raw))
            self._notify()

        request, problem = check_message(raw)
        if problem is not None:
            await self._send(ws, live, problem)
            return
        assert request is not None
        plan = live.plan
        live.creates += 1
        first = live.creates == 1
        if plan.hang:
            return
        errs_now = plan.error is not None and live.creates == plan.error_turn
        if errs_now and not plan.error_after_events:
            assert plan.error is not None
            await self._send(ws, live, dict(plan.error))
            return

        with self._lock:
            problem = previous_response_error(request, self._owners, live.record.account)
        if problem is not None and not (first and self._fails_first(plan)):
            await self._send(ws, live, problem)
            return

        try:
            spec, pace_s = apply_workload(plan.turn, plan.pace_s, requested_workload(request))
        except BadWorkload as exc:
            await self._send(
                ws, live, error_event(400, "invalid_value", str(exc), param=f"metadata.{exc.key}")
            )
            return
        limit = plan.error_after_events if errs_now else self._first_limit(plan, first)
        await self._play_turn(ws, live, request, spec, pace_s, limit, closed)
        if errs_now and plan.error is not None:
            await self._send(ws, live, dict(plan.error))
        elif first:
            await self._fail_first(ws, plan, closed)

    @staticmethod
    def _first_limit(plan: Plan, first: bool) -> int | None:
        """How many of the first turn's events go out before the plan's failure."""
        if not first:
            return None
        if plan.close_code is not None:
            return plan.close_after_events
        if plan.drop_after_events is not None:
            return plan.drop_after_events
        return plan.stall_after_events

    async def _play_turn(
        self,
        ws: ServerConnection,
        live: _Live,
        request: dict[str, Any],
        spec: TurnSpec,
        pace_s: float,
        limit: int | None,
        closed: asyncio.Future[None],
    ) -> None:
        plan = live.plan
        response_id = _new_id("resp")
        kind = "fc" if function_call_for(request, spec) is not None else "msg"
        events = turn_events(
            request,
            spec,
            response_id=response_id,
            item_id=_new_id(kind),
            created_at=int(time.time()),
        )
        if plan.rate_limits is not None:
            await self._send(ws, live, dict(plan.rate_limits))
        if live.creates == 1 and plan.delay_s:
            await asyncio.wait([closed], timeout=plan.delay_s)
        sent = 0
        for index, event in enumerate(events):
            if limit is not None and index >= limit:
                break
            await self._send_extra(ws, live, plan, index)
            if index and pace_s:
                # Wake early when the client goes away, so the turn stops at once.
                await asyncio.wait([closed], timeout=pace_s)
            await self._send(ws, live, event, stamp=spec.stamp_ns)
            sent = index + 1
            if event["type"] == "response.completed":
                self._completed(live, request, event)
        await self._send_extra(ws, live, plan, sent)

    @staticmethod
    async def _fail_first(ws: ServerConnection, plan: Plan, closed: asyncio.Future[None]) -> None:
        """The first turn's scripted end: a close, a cut connection, or a stall."""
        if plan.close_code is not None:
            await ws.close(plan.close_code, plan.reason)
            raise _Stop
        if plan.drop_after_events is not None:
            ws.transport.abort()
            await asyncio.shield(closed)
            raise _Stop
        if plan.stall_after_events is not None:
            # Read nothing more: the client's pings go unanswered until it gives up.
            ws.transport.pause_reading()
            await asyncio.shield(closed)
            raise _Stop

    async def _send_extra(self, ws: ServerConnection, live: _Live, plan: Plan, after: int) -> None:
        """The plan's extra events that go out after the turn's first `after` events."""
        for position, extra in plan.extra_events:
            if position == after:
                await self._send(ws, live, dict(extra))

    # -- plain HTTP

    async def _http_request(self, request: HttpRequest) -> HttpAnswer:
        """A request that is not an upgrade: logged as a connection, answered by the endpoints."""
        with self._lock:
            conn_id = self._next_id
            self._next_id += 1
            record = ConnectionRecord(
                id=conn_id,
                path=request.path,
                headers=list(request.headers),
                account=None,
                opened_at=time.time(),
                method=request.method,
                body=request.body,
            )
            live = _Live(record, self.default_plan)
            self._connections[conn_id] = live
        account: str | None = None
        answer: http_endpoints.Answer
        if self.tokens is not None and (
            bearer_token(request.header("Authorization")) not in self.tokens
        ):
            answer = http_endpoints.Answer(
                401,
                http_error_body(401, "Incorrect API key provided."),
                (("WWW-Authenticate", 'Bearer realm="OpenAI"'),),
            )
        else:
            if self.tokens is not None:
                account = self.tokens[bearer_token(request.header("Authorization")) or ""]
            answer = self._http_answer(request, account)
        with self._lock:
            live.record = replace(
                live.record,
                account=account,
                status=answer.status,
                closed_by="server",
                closed_at=time.time(),
            )
            self._notify()
        self._observe(live)
        body = json.dumps(answer.body).encode() if answer.body is not None else b""
        headers = [("Content-Type", "application/json"), *answer.headers]
        return HttpAnswer(answer.status, headers, body)

    def _http_answer(self, request: HttpRequest, account: str | None) -> http_endpoints.Answer:
        with self._lock:
            plan = next((p for p in self._http_plans if p[0] is None or p[0] == account), None)
            if plan is not None:
                self._http_plans.remove(plan)
            got = (
                http_endpoints.answer(
                    request.method,
                    request.path,
                    request.body,
                    account,
                    self._objects,
                    now=int(time.time()),
                )
                if plan is None or plan[1].status is None
                else http_endpoints.Answer(
                    plan[1].status,
                    plan[1].body if plan[1].body is not None else http_error_body(plan[1].status),
                )
            )
        extra = tuple(plan[1].headers.items()) if plan is not None else ()
        return replace(got, headers=(*got.headers, *extra))

    def _completed(self, live: _Live, request: dict[str, Any], event: dict[str, Any]) -> None:
        """A response completed: its producer is known, and it is stored unless `store: false`."""
        response = event["response"]
        with self._lock:
            self._owners[response["id"]] = live.record.account
            if request.get("store") is not False:
                stored = Stored(live.record.account, request, response)
                self._objects.responses[response["id"]] = stored

    @staticmethod
    def _fails_first(plan: Plan) -> bool:
        """Whether the plan's failure comes before any check of the request."""
        return (
            plan.close_code is not None
            or plan.drop_after_events is not None
            or plan.stall_after_events is not None
        )

    def add_token(self, token: str, account: str) -> None:
        """Accepts one more bearer token as `account` (a refreshed access token)."""
        with self._lock:
            if self.tokens is None:
                self.tokens = {}
            self.tokens[token] = account

    def revoke_token(self, token: str) -> None:
        """Refuses `token` with 401 from now on (an access token the upstream no longer takes)."""
        with self._lock:
            if self.tokens is not None:
                self.tokens.pop(token, None)

    async def _send(
        self, ws: ServerConnection, live: _Live, event: dict[str, Any], *, stamp: bool = False
    ) -> None:
        if ws.state is not State.OPEN:
            raise _Stop
        if stamp:
            event["x_sent_ns"] = time.time_ns()
        await ws.send(encode(event))
        if not self.record_events:
            return
        with self._lock:
            live.events.append(SentEvent(time.time(), event))
            self._notify()

    def _record_end(self, ws: ServerConnection, live: _Live) -> None:
        protocol = ws.protocol
        rcvd, sent = protocol.close_rcvd, protocol.close_sent
        closed_by: ClosedBy
        code: int
        if rcvd is None and sent is None:
            closed_by, code, reason = "abrupt", CloseCode.ABNORMAL_CLOSURE, ""
        elif rcvd is not None and (sent is None or protocol.close_rcvd_then_sent):
            closed_by, code, reason = "client", rcvd.code, rcvd.reason
        else:
            assert sent is not None
            closed_by, code, reason = "server", sent.code, sent.reason
        with self._lock:
            live.record = replace(
                live.record,
                close_code=code,
                close_reason=reason,
                closed_by=closed_by,
                closed_at=time.time(),
            )
            self._by_connection.pop(ws, None)
            self._notify()
        self._observe(live)


class ThreadedUpstream(LoopThread[LocalUpstream]):
    """A `LocalUpstream` in its own event loop and daemon thread, for synchronous code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(LocalUpstream(*args, **kwargs), "local-upstream")

    @property
    def upstream(self) -> LocalUpstream:
        return self.server

    # The LocalUpstream surface, for convenience.

    @property
    def http_url(self) -> str:
        return self.upstream.http_url

    @property
    def default_plan(self) -> Plan:
        return self.upstream.default_plan

    @default_plan.setter
    def default_plan(self, plan: Plan) -> None:
        self.upstream.default_plan = plan

    def script(self, *plans: Plan, account: str | None = None) -> None:
        self.upstream.script(*plans, account=account)

    def script_http(self, *plans: HttpPlan, account: str | None = None) -> None:
        self.upstream.script_http(*plans, account=account)

    def records(self, account: str | None = None) -> list[ConnectionRecord]:
        return self.upstream.records(account)

    def reset(self) -> None:
        self.upstream.reset()

    def pending_plans(self) -> int:
        return self.upstream.pending_plans()

    def owner_of(self, response_id: str) -> str | None:
        return self.upstream.owner_of(response_id)

    def add_token(self, token: str, account: str) -> None:
        self.upstream.add_token(token, account)

    def revoke_token(self, token: str) -> None:
        self.upstream.revoke_token(token)

    def wait_for(
        self, predicate: Callable[[list[ConnectionRecord]], bool], timeout: float
    ) -> list[ConnectionRecord]:
        return self.upstream.wait_for(predicate, timeout)


# -- command line -----------------------------------------------------------


def describe(record: ConnectionRecord) -> str:
    """One log line for a handshake or an end."""
    who = record.account if record.account is not None else "-"
    if record.closed_by is None or record.rejected:
        names = ", ".join(record.header_names())
        return f"#{record.id} {record.status} {record.path} account={who} headers: {names}"
    events = len(record.events)
    return (
        f"#{record.id} closed by {record.closed_by} code={record.close_code} "
        f"reason={record.close_reason!r} events={events} account={who}"
    )


def _parse_tokens(values: Sequence[str]) -> dict[str, str] | None:
    if not values:
        return None
    tokens: dict[str, str] = {}
    for value in values:
        token, sep, account = value.partition("=")
        if not sep or not token or not account:
            raise SystemExit(f"--token wants TOKEN=ACCOUNT, got {value!r}")
        tokens[token] = account
    return tokens


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m responses_ws_bridge.local.upstream",
        description="Serve a local Responses WebSocket upstream until interrupted.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--text", default=TurnSpec().text, help="the text every turn answers")
    parser.add_argument("--deltas", type=int, default=None, help="delta events per turn")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between events")
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="TOKEN=ACCOUNT",
        help="accept this bearer token as this account (repeatable; none: anyone)",
    )
    parser.add_argument(
        "--no-record", action="store_true", help="keep no sent events in memory (benchmarks)"
    )
    parser.add_argument("--quiet", action="store_true", help="no line per connection")
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    plan = Plan(turn=TurnSpec(text=args.text, deltas=args.deltas), pace_s=args.pace)

    async def serve_until_signalled() -> None:
        upstream = LocalUpstream(
            args.host,
            args.port,
            tokens=_parse_tokens(args.token),
            default_plan=plan,
            observer=None if args.quiet else lambda record: print(describe(record), flush=True),
            record_events=not args.no_record,
            ssl_context=tls_context_from(parser, args),
        )
        await serve_until_stopped(
            upstream,
            lambda: print(f"local Responses upstream on {upstream.url}/v1/responses", flush=True),
        )

    asyncio.run(serve_until_signalled())


if __name__ == "__main__":
    main()
