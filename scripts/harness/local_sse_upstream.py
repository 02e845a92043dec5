"""A local Responses HTTP server that streams SSE: the upstream of plain mitmproxy in the benchmark.

It answers `POST …/responses` with the same events as the WebSocket upstream
(`responses_ws_bridge.local.upstream`, both built by
`response_events.turn_events`): as
`text/event-stream`, chunked, one write per event, when the body says
`"stream": true`, else as one JSON body (the final response object).
`GET …/models` lists one model; anything else is a 404. Connections are
HTTP/1.1 keep-alive (asyncio streams and h11).

The request picks its workload through `metadata` (`local_deltas`,
`local_pace_ms`, `local_stamp`; see `response_events.requested_workload`), so
one server process serves every workload of a benchmark run.

`LocalSseUpstream` runs in the caller's event loop; `ThreadedSseUpstream` runs
one in its own thread. `PYTHONPATH=scripts python -m harness.local_sse_upstream`
serves one until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import h11
from responses_ws_bridge.core.sse import encode_event
from responses_ws_bridge.local.loop_thread import (
    AsyncServerContext,
    LoopThread,
    serve_until_stopped,
)
from responses_ws_bridge.local.response_events import (
    BadWorkload,
    TurnSpec,
    apply_workload,
    encode,
    function_call_for,
    http_error_body,
    requested_workload,
    turn_events,
)
from responses_ws_bridge.local.tls import add_tls_arguments, tls_context_from
from responses_ws_bridge.local.upstream import MODELS_BODY

MAX_BODY = 64 * 1024 * 1024
_READ_SIZE = 65536
_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})


class _Reply:
    """What to answer one request with: a whole body, or a turn to stream."""

    def __init__(
        self,
        status: int,
        body: Mapping[str, Any] | None = None,
        *,
        turn: tuple[dict[str, Any], TurnSpec, float] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        # (request, turn spec, pace in seconds) of a streamed turn.
        self.turn = turn


def plan_reply(
    method: str, path: str, body: bytes, default: TurnSpec, default_pace_s: float
) -> _Reply:
    """Decides the answer to one request (no I/O)."""
    route = path.partition("?")[0]
    if method == "GET" and route.endswith("/models"):
        return _Reply(200, MODELS_BODY)
    if not route.endswith("/responses"):
        return _Reply(404, http_error_body(404, f"Invalid URL ({method} {path})"))
    if method != "POST":
        return _Reply(405, http_error_body(405, f"Method {method} not allowed on {route}."))
    try:
        request = json.loads(body)
    except ValueError:
        return _Reply(400, http_error_body(400, "We could not parse the JSON body."))
    if not isinstance(request, dict):
        return _Reply(400, http_error_body(400, "The body must be a JSON object."))
    if not request.get("model"):
        return _Reply(
            400,
            http_error_body(400, "Missing required parameter: 'model'.", code="missing_required"),
        )
    try:
        spec, pace_s = apply_workload(default, default_pace_s, requested_workload(request))
    except BadWorkload as exc:
        return _Reply(400, http_error_body(400, str(exc), code="invalid_value"))
    return _Reply(200, turn=(request, spec, pace_s))


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class LocalSseUpstream(AsyncServerContext):
    """A Responses HTTP (SSE) server on 127.0.0.1; `async with` starts and stops it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        turn: TurnSpec | None = None,
        pace_s: float = 0.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        # Set: the server speaks TLS (https://), as real upstreams do.
        self.ssl_context = ssl_context
        self._requested_port = port
        self.turn = turn if turn is not None else TurnSpec()
        self.pace_s = pace_s
        self.turns_served = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self._requested_port, ssl=self.ssl_context
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stops listening and ends every connection, bounded in time."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self._port}"

    # -- one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = h11.Connection(h11.SERVER)
        try:
            while await self._one_request(conn, reader, writer):
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _one_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serves one request; False when the connection is over."""
        event = await _next_event(conn, reader)
        if not isinstance(event, h11.Request):
            return False
        body = bytearray()
        while True:
            part = await _next_event(conn, reader)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > MAX_BODY:
                    await _send_json(conn, writer, 413, http_error_body(413, "Body too large."))
                    return False
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                return False
        reply = plan_reply(
            event.method.decode(), event.target.decode(), bytes(body), self.turn, self.pace_s
        )
        if reply.turn is None:
            assert reply.body is not None
            await _send_json(conn, writer, reply.status, reply.body)
        else:
            request, spec, pace_s = reply.turn
            self.turns_served += 1
            if request.get("stream") is True:
                await _stream(conn, writer, request, spec, pace_s)
            else:
                await _send_json(conn, writer, 200, _final_response(request, spec))
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _next_event(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(_READ_SIZE))


async def _write(conn: h11.Connection, writer: asyncio.StreamWriter, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        writer.write(data)
    await writer.drain()


async def _send_json(
    conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: Mapping[str, Any]
) -> None:
    data = json.dumps(body).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
    await _write(conn, writer, h11.Response(status_code=status, headers=headers))
    await _write(conn, writer, h11.Data(data=data))
    await _write(conn, writer, h11.EndOfMessage())


def _events(request: Mapping[str, Any], spec: TurnSpec) -> Iterator[dict[str, Any]]:
    kind = "fc" if function_call_for(request, spec) is not None else "msg"
    return turn_events(
        request,
        spec,
        response_id=_new_id("resp"),
        item_id=_new_id(kind),
        created_at=int(time.time()),
    )


def _final_response(request: Mapping[str, Any], spec: TurnSpec) -> dict[str, Any]:
    final: dict[str, Any] = {}
    for event in _events(request, spec):
        if event["type"] in _TERMINAL:
            final = event["response"]
    return final


async def _stream(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    request: Mapping[str, Any],
    spec: TurnSpec,
    pace_s: float,
) -> None:
    headers = [
        ("content-type", "text/event-stream; charset=utf-8"),
        ("cache-control", "no-cache"),
        ("x-request-id", _new_id("req")),
    ]
    await _write(conn, writer, h11.Response(status_code=200, headers=headers))
    for index, event in enumerate(_events(request, spec)):
        if index and pace_s:
            await asyncio.sleep(pace_s)
        if writer.is_closing():
            raise ConnectionResetError("client went away")
        if spec.stamp_ns:
            event["x_sent_ns"] = time.time_ns()
        # One write per event: a flood still reaches the proxy as the kernel batches it.
        await _write(conn, writer, h11.Data(data=encode_event(encode(event), event["type"])))
    await _write(conn, writer, h11.EndOfMessage())


class ThreadedSseUpstream(LoopThread[LocalSseUpstream]):
    """A `LocalSseUpstream` in its own event loop and daemon thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(LocalSseUpstream(*args, **kwargs), "local-sse-upstream")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m harness.local_sse_upstream",
        description="Serve a local Responses HTTP (SSE) upstream until interrupted.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--deltas", type=int, default=None, help="delta events per turn")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between events")
    add_tls_arguments(parser)
    args = parser.parse_args(argv)

    async def serve_until_signalled() -> None:
        upstream = LocalSseUpstream(
            args.host,
            args.port,
            turn=TurnSpec(deltas=args.deltas),
            pace_s=args.pace,
            ssl_context=tls_context_from(parser, args),
        )
        await serve_until_stopped(
            upstream,
            lambda: print(
                f"local Responses SSE upstream on {upstream.url}/v1/responses", flush=True
            ),
        )

    asyncio.run(serve_until_signalled())


if __name__ == "__main__":
    main()
