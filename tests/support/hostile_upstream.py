"""A hostile Responses WebSocket upstream on 127.0.0.1, for the hardening tests.

It does what a compromised or broken upstream might: echo the credential it
was sent (in a close reason, an `error` event, a 429 body), accept a turn and
then say nothing (while still answering pings), send events a client cannot
read (a `type` with a line break, invalid JSON, a binary frame, `1e999`), and
ask for absurd Retry-After delays. Each connection takes the next queued
`Hostility` (else the default) and is logged as a `HostileRecord`, so a test
can also assert that nothing reached the upstream at all.
"""

from __future__ import annotations

import asyncio
import enum
import json
import threading
from dataclasses import dataclass, field

from responses_ws_bridge.local.loop_thread import WebSocketServerContext
from responses_ws_bridge.local.upstream import json_response
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

HUGE_RETRY_AFTER = "1000000000000"


class Behaviour(enum.StrEnum):
    ECHO_TOKEN_IN_CLOSE = "echo-token-in-close"
    ECHO_TOKEN_IN_ERROR = "echo-token-in-error"
    ECHO_TOKEN_IN_429 = "echo-token-in-429"
    SILENT = "silent"
    NEWLINE_TYPE = "newline-type"
    INVALID_JSON = "invalid-json"
    BINARY_FRAME = "binary-frame"
    HUGE_NUMBER = "huge-number"
    HUGE_RETRY_AFTER_429 = "huge-retry-after-429"
    RATE_LIMIT_EVENT_WITHOUT_STATUS = "rate-limit-event-without-status"
    COMPLETE = "complete"  # a normal short turn, for contrast
    HOLD = "hold"  # a normal turn that completes only once `release()` was awaited


@dataclass(frozen=True)
class Hostility:
    """What one connection does; `after_events` normal events come first (0: none)."""

    behaviour: Behaviour
    after_events: int = 0
    close_code: int = 1011


@dataclass
class HostileRecord:
    """One connection: the handshake headers it got (credentials included: test data)."""

    headers: list[tuple[str, str]]
    path: str
    messages: list[str] = field(default_factory=list)
    closed: bool = False


def bearer_of(headers: list[tuple[str, str]]) -> str:
    for name, value in headers:
        if name.lower() == "authorization":
            return value.partition(" ")[2].strip()
    return ""


def created(response_id: str = "resp_hostile") -> str:
    return json.dumps(
        {
            "type": "response.created",
            "sequence_number": 0,
            "response": {"id": response_id, "object": "response", "status": "in_progress"},
        }
    )


def delta(n: int) -> str:
    return json.dumps(
        {
            "type": "response.output_text.delta",
            "sequence_number": n,
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": f"d{n} ",
        }
    )


def completed(n: int, response_id: str = "resp_hostile") -> str:
    return json.dumps(
        {
            "type": "response.completed",
            "sequence_number": n,
            "response": {
                "id": response_id,
                "object": "response",
                "status": "completed",
                "output": [],
            },
        }
    )


class HostileUpstream(WebSocketServerContext):
    """`async with HostileUpstream(...) as upstream:`; `url` is ws://127.0.0.1:PORT."""

    def __init__(self, default: Hostility | None = None, *, close_timeout: float = 2.0) -> None:
        self.host = "127.0.0.1"
        self.default = default if default is not None else Hostility(Behaviour.COMPLETE)
        self.close_timeout = close_timeout
        self._queue: list[Hostility] = []
        self._lock = threading.Lock()
        self._records: list[HostileRecord] = []
        self._plans: dict[ServerConnection, tuple[Hostility, HostileRecord]] = {}
        self._server: Server | None = None
        self._port = 0
        self._released: asyncio.Event | None = None

    async def start(self) -> None:
        self._server = await serve(
            self._serve,
            self.host,
            0,
            process_request=self._process_request,
            close_timeout=self.close_timeout,
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def release(self) -> None:
        """Lets every held turn complete (from the server's loop: `LoopThread.call`)."""
        self._held().set()

    def _held(self) -> asyncio.Event:
        if self._released is None:
            self._released = asyncio.Event()
        return self._released

    def script(self, *plans: Hostility) -> None:
        with self._lock:
            self._queue.extend(plans)

    @property
    def records(self) -> list[HostileRecord]:
        with self._lock:
            return list(self._records)

    def _next(self) -> Hostility:
        with self._lock:
            return self._queue.pop(0) if self._queue else self.default

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        plan = self._next()
        headers = list(request.headers.raw_items())
        record = HostileRecord(headers, request.path)
        with self._lock:
            self._records.append(record)
        token = bearer_of(headers)
        if plan.behaviour in (Behaviour.ECHO_TOKEN_IN_429, Behaviour.HUGE_RETRY_AFTER_429):
            message = (
                f"rate limited for token {token}"
                if plan.behaviour is Behaviour.ECHO_TOKEN_IN_429
                else "rate limited"
            )
            body = {
                "error": {
                    "message": message,
                    "type": "rate_limit_error",
                    "code": "rate_limit_exceeded",
                    "resets_in_seconds": 10**12,
                }
            }
            return json_response(429, body, {"Retry-After": HUGE_RETRY_AFTER})
        self._plans[conn] = (plan, record)
        return None

    async def _serve(self, conn: ServerConnection) -> None:
        plan, record = self._plans.pop(conn)
        token = bearer_of(record.headers)
        try:
            first = await conn.recv()
            record.messages.append(first if isinstance(first, str) else repr(first))
            n = 0
            if plan.after_events or plan.behaviour in (Behaviour.COMPLETE, Behaviour.HOLD):
                await conn.send(created())
                n = 1
                for _ in range(max(0, plan.after_events - 1)):
                    await conn.send(delta(n))
                    n += 1
            await self._misbehave(conn, plan, token, n)
        except ConnectionClosed:
            pass
        finally:
            record.closed = True

    async def _misbehave(self, conn: ServerConnection, plan: Hostility, token: str, n: int) -> None:
        match plan.behaviour:
            case Behaviour.COMPLETE:
                await conn.send(completed(n))
                await conn.wait_closed()
            case Behaviour.HOLD:
                await self._held().wait()
                await conn.send(completed(n))
                await conn.wait_closed()
            case Behaviour.ECHO_TOKEN_IN_CLOSE:
                # A close reason is at most 123 bytes: the token is what matters.
                await conn.close(plan.close_code, f"bad token {token}"[:123])
            case Behaviour.ECHO_TOKEN_IN_ERROR:
                await conn.send(
                    json.dumps(
                        {
                            "type": "error",
                            "status": 400,
                            "error": {
                                "type": "invalid_request_error",
                                "code": "invalid_value",
                                "message": f"token {token} is not allowed here",
                            },
                            "sequence_number": n,
                        }
                    )
                )
                await conn.wait_closed()
            case Behaviour.SILENT:
                # Pings are still answered by the library: only events are missing.
                await conn.wait_closed()
            case Behaviour.NEWLINE_TYPE:
                await conn.send(
                    json.dumps({"type": "response.output_text.delta\nevent: forged", "n": n})
                )
                await conn.wait_closed()
            case Behaviour.INVALID_JSON:
                await conn.send('{"type":"response.output_text.delta","delta":')
                await conn.wait_closed()
            case Behaviour.BINARY_FRAME:
                await conn.send(b'{"type":"response.output_text.delta"}')
                await conn.wait_closed()
            case Behaviour.HUGE_NUMBER:
                await conn.send(
                    '{"type":"response.output_text.delta","sequence_number":'
                    + str(n)
                    + ',"x":1e999}'
                )
                await conn.wait_closed()
            case Behaviour.RATE_LIMIT_EVENT_WITHOUT_STATUS:
                await conn.send(
                    json.dumps(
                        {
                            "type": "error",
                            "error": {
                                "type": "rate_limit_error",
                                "code": "rate_limit_exceeded",
                                "message": "slow down",
                                "resets_in_seconds": 10**12,
                            },
                            "headers": {"retry-after": HUGE_RETRY_AFTER},
                        }
                    )
                )
                await conn.wait_closed()
            case _:  # handshake behaviours never get here
                await conn.close(1011, "unexpected")
