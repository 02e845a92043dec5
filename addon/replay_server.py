"""Serves recorded upstream sessions as a WebSocket server on 127.0.0.1.

The i-th incoming handshake gets recorded session i: the recorded answer (101,
or the rejection with its status, headers and body), then the recorded
messages in order (waiting for each client message where the recording had
one), then the recorded end: the server's close code and reason (1011
included), the client's close awaited, or the TCP connection cut. Every
difference between what arrives and what was recorded is a `Deviation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from addon.recorded_sessions import (
    Deviation,
    RecordedSession,
    account_from_authorization,
    handshake_deviations,
    message_deviations,
)

logger = logging.getLogger(__name__)


class ReplayServer:
    def __init__(
        self,
        sessions: Sequence[RecordedSession],
        *,
        port: int = 0,
        speed: float | None = None,
        tokens: Mapping[str, str] | None = None,
        message_timeout: float = 10.0,
    ) -> None:
        self.sessions = [s for s in sessions if s.servable]
        self.skipped = [s for s in sessions if not s.servable]
        self.speed = speed
        self.tokens = dict(tokens) if tokens is not None else None
        self.message_timeout = message_timeout
        self.deviations: list[Deviation] = []
        self.served = 0
        self._next = 0
        self._assigned: dict[int, RecordedSession] = {}
        self._requested_port = port
        self._server: Server | None = None
        self._done: asyncio.Event | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = next(iter(self._server.sockets)).getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._done = asyncio.Event()
        if not self.sessions:
            self._done.set()
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            self._requested_port,
            process_request=self._process_request,
            compression=None,
            max_size=None,
            ping_interval=None,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        for index in range(self._next, len(self.sessions)):
            self.deviations.append(
                Deviation(index, "handshake", "a connection for this session", "none came")
            )
        self._next = len(self.sessions)

    async def wait_all_served(self, timeout: float) -> bool:
        assert self._done is not None
        try:
            await asyncio.wait_for(self._done.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def __aenter__(self) -> ReplayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- handshake -------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        index = self._next
        if index >= len(self.sessions):
            self.deviations.append(
                Deviation(index, "handshake", "no more sessions in the recording", request.path)
            )
            return connection.respond(404, "no recorded session left for this handshake\n")
        self._next += 1
        session = self.sessions[index]
        self._assigned[id(connection)] = session
        headers = list(request.headers.raw_items())
        self.deviations += handshake_deviations(
            session,
            path=request.path,
            headers=headers,
            account=self._account_of(headers),
            check_account=session.account is not None,
        )
        if session.status == 101:
            return None
        self._finished()
        answer = Headers(
            [(k, v) for k, v in session.response_headers if k.lower() != "content-length"]
        )
        answer["Content-Length"] = str(len(session.response_body))
        return Response(session.status or 500, session.reason, answer, session.response_body)

    def _account_of(self, headers: Sequence[tuple[str, str]]) -> str | None:
        value = next((v for k, v in headers if k.lower() == "authorization"), None)
        if value is None:
            return None
        _scheme, _, token = value.partition(" ")
        if self.tokens is not None:
            return self.tokens.get(token.strip(), "<unknown token>")
        return account_from_authorization(value)

    # -- messages --------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        session = self._assigned.pop(id(ws), None)
        if session is None:
            return
        try:
            await self._walk(ws, session)
        except ConnectionClosed:
            self.deviations.append(
                Deviation(session.index, "client", "to stay until the recorded end", "it closed")
            )
        finally:
            self._finished()

    async def _walk(self, ws: ServerConnection, session: RecordedSession) -> None:
        number = 0
        previous = session.start
        for message in session.messages:
            if message.from_client:
                number += 1
                try:
                    got = await asyncio.wait_for(ws.recv(), self.message_timeout)
                except TimeoutError:
                    self.deviations.append(
                        Deviation(session.index, f"message {number}", message.text, "<none came>")
                    )
                    return
                text = got if isinstance(got, str) else got.decode("utf-8", "replace")
                self.deviations += message_deviations(session.index, number, message.text, text)
            else:
                if self.speed:
                    await asyncio.sleep(max(0.0, message.timestamp - previous) / self.speed)
                await ws.send(message.text)
            previous = message.timestamp
        await self._end(ws, session)

    async def _end(self, ws: ServerConnection, session: RecordedSession) -> None:
        if session.closed_by_client is False and session.close_code not in (None, 1006):
            await ws.close(session.close_code or 1000, session.close_reason)
        elif session.closed_by_client is False or session.close_code == 1006:
            # Recorded as lost without a close frame: cut the connection.
            if ws.transport is not None:
                ws.transport.abort()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.wait_closed(), self.message_timeout)

    def _finished(self) -> None:
        self.served += 1
        if self.served >= len(self.sessions) and self._done is not None:
            self._done.set()
