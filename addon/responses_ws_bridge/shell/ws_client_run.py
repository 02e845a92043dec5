"""Carries out a WebSocket client's engine: the turn's commands, plus the client's socket.

`core.ws_client_engine.WsClientEngine` decides; this runs what it asks. The
upstream side is a bridged turn's (`bridge_service._TurnRun`: state, tokens,
`Open` with recording and connections made ahead, `Send`, `Receive`,
`Release`); the client's side is a `ClientSide` (inside mitmproxy,
`addons.ws_streaming.ClientSocket`). The session holds its one upstream
socket across turns, recorded one flow per turn like a reused socket
(`Attach`, `Idle`). A client that goes away while the upstream is awaited is
the engine's `ClientLeft`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Protocol

from responses_ws_bridge.core.turn_commands import Receive
from responses_ws_bridge.core.turns import Turn
from responses_ws_bridge.core.ws_client_commands import (
    AcceptClient,
    Attach,
    ClientClose,
    ClientClosed,
    ClientRecv,
    ClientSend,
    ClientText,
    Idle,
    NewTurn,
    RefuseClient,
)
from responses_ws_bridge.core.ws_client_engine import WsClientEngine, WsClientRequest
from responses_ws_bridge.shell.bridge_service import BridgeService, _TurnRun
from responses_ws_bridge.shell.sink import ClientGone
from responses_ws_bridge.shell.turn_state import TurnState


class ClientSide(Protocol):
    """One client WebSocket as the service sees it."""

    # Resolved once the client's side ended.
    gone: asyncio.Future[ClientClosed]

    def accept(self, headers: Sequence[tuple[str, str]]) -> None: ...

    def refuse(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None: ...

    async def recv(self) -> ClientText | ClientClosed: ...

    async def send(self, data: str | bytes) -> None: ...

    async def close(self, code: int | None, reason: str) -> None: ...


async def serve_websocket(
    service: BridgeService,
    request: WsClientRequest,
    client: ClientSide,
    turns: list[Turn] | None = None,
) -> list[Turn]:
    """Serves one client WebSocket through the pool; returns its turns (their reports),
    kept in `turns` as they start when given.

    Raises what made the client leave (`ClientGone`), as `BridgeService.serve` does.
    """
    engine = WsClientEngine(
        request,
        service.settings.engine,
        accounts_own_upstreams=service.accounts_own_upstreams(),
        scrub=service.state.scrubber(),
        clocks=service.clocks,
        jitter=service.jitter,
        turns=turns,
    )
    run = WsClientRun(service, engine.turns[0], client, service.turn_state())
    try:
        await run.drive(engine.run())
    finally:
        if run.session is not None:
            # The engine closes what it holds; a bug must not leave a socket open.
            service.sessions.discard(run.session, code=1011, reason="bridge error")
    return engine.turns


class _NoHttpAnswer:
    """A WebSocket client gets no HTTP answer body: the engine never asks for one."""

    started = False
    finished = False

    async def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        raise RuntimeError("a WebSocket client has no HTTP answer")

    async def write(self, data: bytes) -> None:
        raise RuntimeError("a WebSocket client has no HTTP answer")

    def write_now(self, data: bytes) -> bool:
        raise RuntimeError("a WebSocket client has no HTTP answer")

    async def finish(self) -> None:
        raise RuntimeError("a WebSocket client has no HTTP answer")

    async def respond(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        raise RuntimeError("a WebSocket client has no HTTP answer")

    async def abort(self, reason: str) -> None:
        raise RuntimeError("a WebSocket client has no HTTP answer")


class WsClientRun(_TurnRun):
    """One client WebSocket's run: the engine's `NewTurn` makes each message the turn."""

    def __init__(
        self, service: BridgeService, first: Turn, client: ClientSide, state: TurnState
    ) -> None:
        super().__init__(service, first, _NoHttpAnswer(), state)
        self.client = client

    async def _accept(self, command: AcceptClient) -> None:
        self.client.accept(command.headers)

    async def _refuse(self, command: RefuseClient) -> None:
        self.client.refuse(command.status, command.headers, command.body)

    async def _client_recv(self, _: ClientRecv) -> ClientText | ClientClosed:
        return await self.client.recv()

    async def _client_send(self, command: ClientSend) -> None:
        await self.client.send(command.data)

    async def _client_close(self, command: ClientClose) -> None:
        await self.client.close(command.code, command.reason)

    async def _new_turn(self, command: NewTurn) -> None:
        self.turn = command.turn

    async def _attach(self, command: Attach) -> None:
        session = self._session()
        if session.tap is not None:
            session.tap.attach(self.turn, command.attempt)

    async def _idle(self, _: Idle) -> None:
        self._session().idle()

    async def _receive_or_left(self, command: Receive) -> object:
        """The upstream's next frames, unless the client leaves first (`ClientLeft`)."""
        receiving = asyncio.ensure_future(self._receive(command))
        waiting: set[asyncio.Future[object]] = {receiving, self.client.gone}  # type: ignore[arg-type]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if receiving.done():
            return receiving.result()
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiving
        raise ClientGone


# The turn's table, plus the client's side (a table on the class, as `_TurnRun`'s).
WsClientRun.handlers = {
    **_TurnRun.handlers,
    AcceptClient: WsClientRun._accept,
    RefuseClient: WsClientRun._refuse,
    ClientRecv: WsClientRun._client_recv,
    ClientSend: WsClientRun._client_send,
    ClientClose: WsClientRun._client_close,
    NewTurn: WsClientRun._new_turn,
    Attach: WsClientRun._attach,
    Idle: WsClientRun._idle,
    Receive: WsClientRun._receive_or_left,
}
